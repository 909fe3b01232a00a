//! The crash autopsy: `fnokern autopsy RUN --steps A..B` replays a run's steps bit for bit and
//! shows, per step and per part of the generator, where a blow-up starts.
//!
//! The replay is an ordinary resumed run ([`train::train_observed`]) in `OUT/replay`: it starts
//! from the run's newest checkpoint at or before step A (its initial weights when there is none:
//! `train.checkpoint_every = 1` keeps one per epoch and shortens the replay to within an epoch),
//! trains through step B, and checks every step's loss against the run's metrics.jsonl, bit for
//! bit: the first step that differs ends the autopsy with an error, and nothing is reported. At
//! steps A..B a [`Recorder`] watches: the activation RMS and largest magnitude of each part's
//! output and each block's branch and output ([`crate::autograd::Tape::note`]), every parameter
//! tensor's gradient norm before and after clipping, its update-to-weight ratio, Adam's second
//! moment there (smallest and median bias-corrected sqrt(v), the share of entries within 10 x eps
//! of eps, the median per-entry rate lr / (sqrt(v) + eps)), and the batch's patterns with each
//! one's loss alone.
//!
//! OUT/autopsy.jsonl holds one record per step; OUT/autopsy.json the verdict: the first part
//! and quantity to leave its own baseline (its median over the window's calm steps) by
//! `factor` (upwards; the smallest sqrt(v) downwards), at which step, and whether that was
//! before the loss moved (the first step whose loss is over `factor` x the median of the steps
//! before it). Heat maps of every part's gradient norm
//! and update ratio over the steps, and the activations along the generator at the first bad
//! step, go beside them. A second autopsy of the same window re-reads autopsy.jsonl instead of
//! replaying.

mod verdict;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::autograd::{ActivationProbe, ParamStore, Tape};
use crate::config::{Config, OptimizerKind};
use crate::error::{Error, Result};
use crate::optim::{sumsq_by_slot, sumsq_each};
use crate::tensor::Tensor;
use crate::train::{self, checkpoint, forward_and_loss, RunOptions, StepAt, StepObserver, StepPoint, StepReport, Trainer};

pub use verdict::{Departure, Verdict};

/// What to replay and how to judge it.
#[derive(Clone, Debug)]
pub struct Options {
    /// The run directory `fnokern train` (or a sweep) wrote.
    pub run: PathBuf,
    /// The first and last step to record (both included).
    pub steps: (u64, u64),
    /// Where the autopsy goes (default RUN/autopsy-A-B).
    pub out: Option<PathBuf>,
    /// A quantity leaves its baseline when it is over `factor` x its median over the calm steps
    /// (or under 1 / `factor` of it); the loss moves when it is over `factor` x its own.
    pub factor: f64,
    /// At most this many calm steps at the window's start make the baselines.
    pub baseline_steps: usize,
    pub progress: bool,
    pub stop: Option<Arc<AtomicBool>>,
}

impl Options {
    /// The window `--around K` means: 40 steps before K (the baseline), K, and 10 after.
    pub fn around(k: u64) -> (u64, u64) {
        (k.saturating_sub(40), k + 10)
    }

    /// Parses `A..B` (both included).
    pub fn parse_steps(s: &str) -> Result<(u64, u64)> {
        let bad = || Error::invalid("autopsy", format!("--steps takes A..B (two step numbers, both included, A < B), got {s:?}"));
        let (a, b) = s.split_once("..").ok_or_else(bad)?;
        let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().trim_start_matches('=').parse().map_err(|_| bad())?);
        if a >= b {
            return Err(bad());
        }
        Ok((a, b))
    }
}

/// One parameter tensor at one step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParamStat {
    pub name: String,
    /// Its part: a row of the generator's table.
    pub part: usize,
    pub weight_norm: f64,
    /// Before and after clipping (steps that updated).
    pub grad_norm: Option<f64>,
    pub grad_norm_clipped: Option<f64>,
    /// ||w after - w before|| / ||w before||.
    pub update_ratio: Option<f64>,
    /// Adam's bias-corrected second moment after the step: smallest and median sqrt(v).
    pub sqrt_v_min: Option<f64>,
    pub sqrt_v_median: Option<f64>,
    /// The share of entries whose sqrt(v) is below 10 x eps (where eps sets the step size).
    pub near_eps: Option<f64>,
    /// The median per-entry rate lr / (sqrt(v) + eps) of the next update.
    pub adam_rate_median: Option<f64>,
}

/// One noted activation ([`crate::autograd::ActivationStat`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Activation {
    pub part: usize,
    pub what: String,
    pub rms: f64,
    pub max_abs: f64,
}

/// One training pattern of the step's batch and its loss alone (the main loss, before the update).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub pattern: usize,
    pub loss: f64,
}

/// One replayed step: a line of autopsy.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: usize,
    pub outcome: String,
    pub loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub grad_norm_clipped: Option<f64>,
    /// grad_norm_clipped / grad_norm.
    pub clip_coef: Option<f64>,
    pub samples: Vec<Sample>,
    pub activations: Vec<Activation>,
    pub params: Vec<ParamStat>,
}

/// The first line of autopsy.jsonl: what was replayed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub run: String,
    pub steps: (u64, u64),
    /// The generator's parts (the table `fnokern model` prints), in order.
    pub parts: Vec<String>,
    /// Where the replay started: the checkpoint's step (0: the initial weights).
    pub from_step: u64,
}

/// What the autopsy found.
#[derive(Debug)]
pub struct Report {
    pub out: PathBuf,
    pub header: Header,
    pub records: Vec<StepRecord>,
    pub verdict: Verdict,
    /// The replay was read back from an earlier autopsy of the same window.
    pub reused: bool,
}

/// A step the run logged: its loss and outcome.
struct Logged {
    loss: Option<f64>,
    outcome: String,
}

/// The run's step records from its metrics.jsonl.
fn logged_steps(run: &Path) -> Result<BTreeMap<u64, Logged>> {
    let path = run.join("metrics.jsonl");
    let text = fs::read_to_string(&path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let mut steps = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| crate::io::bad(&path, format!("line {} is not JSON: {e}", i + 1)))?;
        if v["kind"] != "step" {
            continue;
        }
        let step = v["step"].as_u64().ok_or_else(|| crate::io::bad(&path, format!("line {} has no step number", i + 1)))?;
        steps.insert(step, Logged { loss: v["loss"].as_f64(), outcome: v["outcome"].as_str().unwrap_or("").to_string() });
    }
    Ok(steps)
}

/// Runs the autopsy (or re-reads its replay) and writes its files.
pub fn autopsy(opts: &Options, say: &mut dyn FnMut(&str)) -> Result<Report> {
    if !(opts.factor.is_finite() && opts.factor > 1.0) {
        return Err(Error::invalid("autopsy", format!("--factor must be a number above 1, got {}", opts.factor)));
    }
    if opts.baseline_steps < 3 {
        return Err(Error::invalid("autopsy", format!("--baseline must be at least 3 steps, got {}", opts.baseline_steps)));
    }
    let (a, b) = opts.steps;
    let run = &opts.run;
    let config_path = run.join("config.toml");
    if !config_path.is_file() {
        return Err(Error::invalid("autopsy", format!("{} holds no config.toml: not a run directory", run.display())));
    }
    let cfg = Config::load(&config_path)?;
    let logged = logged_steps(run)?;
    let last = logged.keys().next_back().copied();
    if last.is_none_or(|l| l < b) {
        return Err(Error::invalid(
            "autopsy",
            format!("{} logged steps up to {}: the window {a}..{b} goes beyond them", run.display(), last.map_or("none".into(), |l| l.to_string())),
        ));
    }
    let out = opts.out.clone().unwrap_or_else(|| run.join(format!("autopsy-{a}-{b}")));
    fs::create_dir_all(&out).map_err(|source| Error::Io { path: out.display().to_string(), source })?;
    let jsonl = out.join("autopsy.jsonl");
    let (header, records, reused) = match read_jsonl(&jsonl, run, opts.steps)? {
        Some((h, r)) => {
            say(&format!("re-reading the replay of steps {a}..{b} in {} (delete it to replay again)", jsonl.display()));
            (h, r, true)
        }
        None => {
            let (h, r) = replay(&cfg, opts, &out, &logged, say)?;
            (h, r, false)
        }
    };
    let verdict = verdict::judge(&header, &records, opts.factor, opts.baseline_steps)?;
    verdict::write(&out, &header, &records, &verdict, opts.factor)?;
    Ok(Report { out, header, records, verdict, reused })
}

/// autopsy.jsonl's header and records, when it holds this run's window.
fn read_jsonl(path: &Path, run: &Path, steps: (u64, u64)) -> Result<Option<(Header, Vec<StepRecord>)>> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(None) };
    let mut lines = text.lines();
    let Some(header) = lines.next().and_then(|l| serde_json::from_str::<Header>(l).ok()) else { return Ok(None) };
    if header.steps != steps || header.run != run.display().to_string() {
        return Ok(None);
    }
    let records: Vec<StepRecord> = lines.map(serde_json::from_str).collect::<std::result::Result<_, _>>().map_err(|e| crate::io::bad(path, e.to_string()))?;
    if records.len() as u64 != steps.1 - steps.0 + 1 {
        return Ok(None);
    }
    Ok(Some((header, records)))
}

/// Replays the run into OUT/replay and records steps A..B; writes autopsy.jsonl.
fn replay(cfg: &Config, opts: &Options, out: &Path, logged: &BTreeMap<u64, Logged>, say: &mut dyn FnMut(&str)) -> Result<(Header, Vec<StepRecord>)> {
    let (a, b) = opts.steps;
    let dir = out.join("replay");
    let from = prepare_replay(&opts.run, &dir, a)?;
    match from {
        0 => say(&format!(
            "replaying {} from its initial weights to step {b} (a checkpoint at or before step {a} would shorten this: train.checkpoint_every = 1)",
            opts.run.display()
        )),
        s => say(&format!("replaying {} from its checkpoint at step {s} to step {b}", opts.run.display())),
    }
    let mut recorder = Recorder::new(cfg, logged, opts.steps);
    let run_opts = RunOptions { resume: true, progress: opts.progress, stop: opts.stop.clone(), ..RunOptions::new(dir.clone()) };
    // Once the window is recorded the replay stops as an interrupted run would: that is not news.
    let done = recorder.done.clone();
    let summary = train::train_observed(cfg, &run_opts, &mut recorder, &mut |m| {
        if !done.get() {
            say(&format!("replay: {m}"))
        }
    })?;
    if let Some(e) = recorder.failed.take() {
        return Err(e);
    }
    if recorder.records.len() as u64 != b - a + 1 {
        let why = if summary.interrupted {
            "it was interrupted".to_string()
        } else {
            format!("it ended at step {} ({})", summary.steps, summary.reason.unwrap_or_default())
        };
        return Err(Error::invalid("autopsy", format!("the replay recorded {} of the steps {a}..{b}: {why}", recorder.records.len())));
    }
    let header = Header { run: opts.run.display().to_string(), steps: opts.steps, parts: recorder.parts.clone(), from_step: from };
    write_jsonl(&out.join("autopsy.jsonl"), &header, &recorder.records)?;
    // The replay's directory held a copy of the checkpoint and the replayed steps' log.
    let _ = fs::remove_dir_all(&dir);
    Ok((header, std::mem::take(&mut recorder.records)))
}

/// autopsy.jsonl, written atomically: the header, then the records.
fn write_jsonl(path: &Path, header: &Header, records: &[StepRecord]) -> Result<()> {
    let mut text = serde_json::to_string(header).map_err(|e| Error::invalid("autopsy", e.to_string()))?;
    text.push('\n');
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(|e| Error::invalid("autopsy", e.to_string()))?);
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Makes `dir` a run directory that resumes at or before step `a`: an interrupted replay of
/// an earlier autopsy when it stopped at or before `a`, else the run's newest checkpoint at or
/// before `a` (none: from the beginning). Returns the step it starts from.
fn prepare_replay(run: &Path, dir: &Path, a: u64) -> Result<u64> {
    let usable = |d: &Path| checkpoint::candidates(d).into_iter().find_map(|(p, s)| s.ok().filter(|s| s.trainer.steps <= a).map(|s| (p, s.trainer.steps)));
    if dir.is_dir() {
        if let Some((_, steps)) = usable(dir).filter(|_| dir.join(".lock").is_file()) {
            // Only `last` is ever written there, and the resume takes the newest.
            return Ok(steps);
        }
        fs::remove_dir_all(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    }
    fs::create_dir_all(dir.join("checkpoints")).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    train::run_dir::claim(dir)?;
    match usable(run) {
        Some((path, steps)) => {
            crate::io::copy_atomic(&path, &dir.join("checkpoints/last.safetensors"))?;
            Ok(steps)
        }
        None => Ok(0),
    }
}

/// Watches the replay: checks every step's loss against the run's, and records steps A..B.
struct Recorder<'a> {
    logged: &'a BTreeMap<u64, Logged>,
    window: (u64, u64),
    adam: Option<(f64, f64, f64)>,
    parts: Vec<String>,
    /// Each parameter id's part.
    part_of: Vec<usize>,
    probe: ActivationProbe,
    /// The step under way in the window: its record so far and the weights before it.
    current: Option<(StepRecord, ParamStore)>,
    grad_sq: Option<Vec<f64>>,
    clipped_sq: Option<Vec<f64>>,
    records: Vec<StepRecord>,
    /// A failure inside `point` (which cannot return one), reported after the step.
    failed: Option<Error>,
    /// The window's last step is recorded.
    done: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<'a> Recorder<'a> {
    fn new(cfg: &Config, logged: &'a BTreeMap<u64, Logged>, window: (u64, u64)) -> Recorder<'a> {
        let t = &cfg.train;
        let adam = matches!(t.optimizer, OptimizerKind::Adam | OptimizerKind::Adamw).then_some((t.beta1, t.beta2, t.adam_eps));
        Recorder {
            logged,
            window,
            adam,
            parts: Vec::new(),
            part_of: Vec::new(),
            probe: ActivationProbe::default(),
            current: None,
            grad_sq: None,
            clipped_sq: None,
            records: Vec::new(),
            failed: None,
            done: Default::default(),
        }
    }

    fn in_window(&self, step: u64) -> bool {
        (self.window.0..=self.window.1).contains(&step)
    }

    /// The record of the step `r` ended, from what was seen during it.
    fn record(&mut self, trainer: &Trainer, r: &StepReport, mut rec: StepRecord, before: &ParamStore) -> Result<StepRecord> {
        let params = &trainer.model().params;
        let weights: Vec<&Tensor> = before.values().iter().collect();
        let w_sq = sumsq_each(&weights)?;
        let opt = trainer.optimizer_state();
        let grad_sq = self.grad_sq.take();
        let clipped_sq = self.clipped_sq.take();
        for (id, name, after) in params.iter() {
            let i = id.0;
            let old = &before.values()[i];
            let update_ratio = if grad_sq.is_some() { Some(diff_norm(after, old)? / w_sq[i].sqrt().max(f64::MIN_POSITIVE)) } else { None };
            let mut s = ParamStat {
                name: name.to_string(),
                part: self.part_of[i],
                weight_norm: w_sq[i].sqrt(),
                grad_norm: grad_sq.as_ref().map(|g| g[i].sqrt()),
                grad_norm_clipped: clipped_sq.as_ref().map(|g| g[i].sqrt()),
                update_ratio,
                sqrt_v_min: None,
                sqrt_v_median: None,
                near_eps: None,
                adam_rate_median: None,
            };
            if let (Some((_, beta2, eps)), Some(Some(v))) = (self.adam, opt.v.get(i)) {
                let correction = 1.0 - beta2.powf(opt.updates.max(1) as f64);
                let mut root: Vec<f64> = v.to_f64_vec()?.into_iter().map(|x| (x / correction).max(0.0).sqrt()).collect();
                root.sort_by(f64::total_cmp);
                let median = root[root.len() / 2];
                s.sqrt_v_min = root.first().copied();
                s.sqrt_v_median = Some(median);
                s.near_eps = Some(root.iter().filter(|&&x| x < 10.0 * eps).count() as f64 / root.len() as f64);
                s.adam_rate_median = Some(trainer.lr() / (median + eps));
            }
            rec.params.push(s);
        }
        rec.outcome = r.outcome.to_string();
        rec.loss = r.loss;
        rec.lr = r.lr;
        rec.grad_norm = r.clip.map(|c| c.norm_before);
        rec.grad_norm_clipped = r.clip.map(|c| c.norm_after);
        rec.clip_coef = r.clip.map(|c| c.norm_after / c.norm_before);
        rec.activations =
            self.probe.borrow_mut().drain(..).map(|s| Activation { part: s.part, what: s.what.to_string(), rms: s.rms, max_abs: s.max_abs }).collect();
        Ok(rec)
    }
}

/// ||x - y|| (same shapes), on the host.
fn diff_norm(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (x, y) = (x.to_f64_vec()?, y.to_f64_vec()?);
    Ok(x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt())
}

impl StepObserver for Recorder<'_> {
    fn start(&mut self, trainer: &mut Trainer) -> Result<()> {
        let model = trainer.model();
        self.parts = model.table().iter().map(|r| r.part.clone()).collect();
        self.part_of = vec![0; model.params.len()];
        for (p, row) in model.table().iter().enumerate() {
            for i in row.param_ids.clone() {
                self.part_of[i] = p;
            }
        }
        Ok(())
    }

    fn before_step(&mut self, trainer: &mut Trainer, at: &StepAt) -> Result<()> {
        if !self.in_window(at.step) {
            trainer.set_activation_probe(None);
            return Ok(());
        }
        // Each pattern's loss alone, before the update (the norms are per sample: exact).
        let model = trainer.model();
        let obj = trainer.objective();
        let mut samples = Vec::with_capacity(at.patterns.len());
        for &p in at.patterns {
            let batch = (at.batch_of)(&[p])?;
            let f = forward_and_loss(&mut Tape::with_params(&model.params), model, &obj, &batch, &mut |_| {})?;
            samples.push(Sample { pattern: p, loss: f.main.value().scalar_value()? });
        }
        self.probe.borrow_mut().clear();
        trainer.set_activation_probe(Some(self.probe.clone()));
        let rec = StepRecord {
            step: at.step,
            epoch: at.epoch,
            outcome: String::new(),
            loss: None,
            lr: 0.0,
            grad_norm: None,
            grad_norm_clipped: None,
            clip_coef: None,
            samples,
            activations: Vec::new(),
            params: Vec::new(),
        };
        self.current = Some((rec, trainer.model().params.clone()));
        Ok(())
    }

    fn point(&mut self, p: StepPoint) {
        let StepPoint::Gradients { grads, clipped } = p else { return };
        if self.current.is_none() || self.failed.is_some() {
            return;
        }
        match sumsq_by_slot(grads) {
            Ok(all) => {
                if clipped {
                    self.clipped_sq = Some(all);
                } else {
                    self.grad_sq = Some(all);
                }
            }
            Err(e) => self.failed = Some(e),
        }
    }

    fn after_step(&mut self, trainer: &Trainer, r: &StepReport) -> Result<bool> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let Some(logged) = self.logged.get(&r.step) else {
            return Err(Error::invalid("autopsy", format!("the run's metrics.jsonl has no step {}: it cannot be checked", r.step)));
        };
        let same = match (r.loss, logged.loss) {
            (Some(x), Some(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            (None, None) => true,
            _ => false,
        } && r.outcome.as_str() == logged.outcome;
        if !same {
            let show = |l: Option<f64>| l.map_or("none".into(), |l| format!("{l:?}"));
            return Err(Error::invalid(
                "autopsy",
                format!(
                    "the replay differs from the run at step {}: loss {} ({}), the run logged {} ({}); \
                     the run's config, data, code or machine is not what it was, and nothing is reported",
                    r.step,
                    show(r.loss),
                    r.outcome,
                    show(logged.loss),
                    logged.outcome
                ),
            ));
        }
        if let Some((rec, before)) = self.current.take() {
            let rec = self.record(trainer, r, rec, &before)?;
            self.records.push(rec);
        }
        let more = r.step < self.window.1;
        self.done.set(!more);
        Ok(more)
    }
}
