//! The training loop: epochs, validation, checkpoints, logs and the run directory, around the
//! one training step of [`step::Trainer`].
//!
//! Each step's outcome is one line of metrics.jsonl. Checkpoints (parameters, optimiser state,
//! trainer state, a checksum) are written atomically at epoch ends: `last`, `best` and every
//! `checkpoint_every` epochs, and `last` again where an interrupted run (SIGINT, SIGTERM) stops.
//! `--resume` continues from the newest checkpoint that loads, bit for bit, or starts afresh when
//! the run was killed before its first one. One process at a time holds a run directory.
//!
//! Run directory: config.toml (resolved), metrics.jsonl, summary.json, checkpoints/,
//! weights.safetensors (finished runs), and loss.png, grad_norm.png, lr.png, reconstruction.png.

pub(crate) mod checkpoint;
pub mod parity;
pub mod plot;
pub mod run_dir;
pub mod step;
pub mod workload;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::autograd::Tape;
use crate::backend;
use crate::config::Config;
use crate::data::{self, npz::NpzSplit};
use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};
use crate::eval;
use crate::model::weights;
use crate::model::Generator;
use crate::optim;
use crate::tensor::DType;
use run_dir::{DirLock, MetricsLog};
use workload::RunData;

pub use step::{forward_and_loss, Forward, Objective, SpikeGuard, StepOutcome, StepPoint, StepReport, Trainer, TrainerState};

/// How a run is driven (not part of its identity).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub resume: bool,
    /// Stop after this many epochs of this invocation (as if killed), keeping the schedule's horizon.
    pub stop_after_epochs: Option<usize>,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// The preset's name and why it was chosen, for the summary.
    pub preset: Option<String>,
    /// Set (by a signal handler) to stop cleanly: the run checkpoints where it is, at the end of
    /// the current group of micro-batches, writes its summary and returns `interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Start a new run from this checkpoint of another run (its weights, optimiser and trainer
    /// state, its metrics so far) under this run's config, which may differ in anything but the
    /// model: the same state trained on with one thing changed.
    pub fork: Option<PathBuf>,
}

impl RunOptions {
    /// A fresh run in `out_dir`, without a progress bar.
    pub fn new(out_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions { out_dir: out_dir.into(), ..RunOptions::default() }
    }
}

/// The run's state in a checkpoint, besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub epochs_done: usize,
    /// The step's state: steps, updates, schedule, spike window, loss scaler, outcome counts.
    #[serde(flatten)]
    pub trainer: TrainerState,
    pub best_val: Option<f64>,
    /// The epoch (counted from 1) of the best validation loss.
    #[serde(default)]
    pub best_epoch: Option<usize>,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    /// Micro-batches of epoch `epochs_done` already run: 0 at an epoch's end, more in the
    /// checkpoint of an interrupted run (with the epoch's training-loss sum so far).
    #[serde(default)]
    pub epoch_steps: u64,
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub epoch_loss_count: usize,
    /// The rollback point's optimiser update count, in checkpoints written before
    /// `good_points` (which one held a point only mid-epoch).
    #[serde(default)]
    pub good_optimizer_updates: Option<u64>,
    /// The rollback points (oldest first) besides their tensors; set by the checkpoint writer.
    #[serde(default)]
    pub good_points: Option<Vec<checkpoint::GoodMeta>>,
    /// Training time so far, over every invocation.
    #[serde(default)]
    pub wall_seconds: f64,
    /// Epochs in a row without a validation loss below the best by `early_stopping_min_delta`.
    #[serde(default)]
    pub epochs_without_improvement: usize,
    /// The run ended by early stopping.
    #[serde(default)]
    pub stopped_early: bool,
    /// The config the run was started with (TOML), to refuse a resume under another.
    pub config: String,
}

/// Why the trainer stopped a run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Crash {
    /// Non-finite inputs, losses, gradients, weights or validation loss, or an epoch without a
    /// single update.
    Nonfinite,
    /// Loss spikes that kept being skipped or rolled back.
    Spike,
    /// An allocation over the device's memory budget.
    Oom,
}

/// `fnokern train`'s exit status for each way a run ends (README "Exit status").
pub mod exit {
    /// The run finished, or stopped where it was asked to (`--stop-after-epochs`).
    pub const OK: u8 = 0;
    /// An error before or outside training: bad input, a file that cannot be read or written.
    pub const ERROR: u8 = 1;
    /// Crashed: non-finite values.
    pub const NONFINITE: u8 = 3;
    /// Crashed: repeated loss spikes.
    pub const SPIKE: u8 = 4;
    /// Crashed: out of memory (the budget or the device).
    pub const OOM: u8 = 5;
    /// Interrupted (SIGINT or SIGTERM), checkpointed: `--resume` continues it.
    pub const INTERRUPTED: u8 = 130;
}

/// What summary.json holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Summary {
    pub preset: Option<String>,
    pub finished: bool,
    pub crashed: bool,
    /// What stopped a crashed run: `nonfinite`, `spike` or `oom` (see [`Crash`]).
    pub crash_kind: Option<Crash>,
    /// Stopped by a signal, checkpointed where it was.
    #[serde(default)]
    pub interrupted: bool,
    /// Ended by early stopping (`train.early_stopping_patience`): finished before `train.epochs`.
    #[serde(default)]
    pub early_stopped: bool,
    /// Training has ended and its weights are written, but the final evaluation, metrics.csv
    /// and the plots are not yet: a process killed now left this; `--resume` completes them.
    /// A run is `finished` only once all of them are written.
    #[serde(default)]
    pub finishing: bool,
    pub reason: Option<String>,
    pub epochs_done: usize,
    pub steps: u64,
    pub updates: u64,
    pub first_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub outcomes: BTreeMap<StepOutcome, u64>,
    pub metrics: Option<serde_json::Value>,
    /// The epoch whose weights `metrics` scores (the last, or the best with
    /// `train.evaluate_best` or an early stop that restored the best).
    #[serde(default)]
    pub evaluated_epoch: Option<usize>,
    pub parameters: usize,
    pub wall_seconds: f64,
}

impl Summary {
    /// Steps whose outcome passes `which` (e.g. [`StepOutcome::is_spike`]).
    pub fn count(&self, which: impl Fn(StepOutcome) -> bool) -> u64 {
        self.outcomes.iter().filter(|(o, _)| which(**o)).map(|(_, n)| n).sum()
    }

    /// The process exit status of a run that ended this way ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match (self.crash_kind, self.interrupted) {
            (Some(Crash::Nonfinite), _) => exit::NONFINITE,
            (Some(Crash::Spike), _) => exit::SPIKE,
            (Some(Crash::Oom), _) => exit::OOM,
            (None, true) => exit::INTERRUPTED,
            (None, false) => exit::OK,
        }
    }
}

/// An evenly spaced subset of 0..n of size k (all when k is 0 or at least n).
fn subset(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || k >= n {
        (0..n).collect()
    } else {
        (0..k).map(|i| i * n / k).collect()
    }
}

/// Mean main loss over a split's patterns `idx`, without gradients.
pub(crate) fn validate(g: &Generator, obj: &Objective, batch_size: usize, split: &NpzSplit, idx: &[usize], dev: &Device) -> Result<f64> {
    validate_with(g, obj, batch_size, idx, &|chunk| data::batch(split, chunk, DType::F32, dev))
}

/// Mean main loss over the samples `idx`, batched by `batch`, without gradients.
fn validate_with(g: &Generator, obj: &Objective, batch_size: usize, idx: &[usize], batch: &dyn Fn(&[usize]) -> Result<data::Batch>) -> Result<f64> {
    let mut total = 0.0;
    for chunk in idx.chunks(batch_size) {
        let b = batch(chunk)?;
        let mut t = Tape::with_params(&g.params);
        let f = forward_and_loss(&mut t, g, obj, &b, &mut |_| {})?;
        total += f.main.value().scalar_value()? * chunk.len() as f64;
    }
    Ok(total / idx.len().max(1) as f64)
}

/// Predicts the first test object's patches and scores the reconstruction stitched as
/// `train.stitch` says: its metrics, with `stitch` naming the stitching and, for `blend` and
/// `aligned`, the reference's `center` stitching's metrics beside them (`center_stitch`).
/// reconstruction.png goes to `png` when given.
fn score_object(g: &Generator, cfg: &Config, split: &NpzSplit, dev: &Device, png: Option<(&Path, &str)>) -> Result<Option<serde_json::Value>> {
    if split.centres.is_none() || split.ground_truth.is_none() {
        return Ok(None);
    }
    let p = crate::predict::predict_patches(g, split, &crate::predict::first_object(split), cfg.train.batch_size, dev, &mut |_| {})?;
    let scored = |how| eval::score(&eval::beside_truth(split, eval::place_as(how, split, &p.amp, &p.phase, &p.object)?)?);
    let (m, aligned) = scored(cfg.train.stitch)?;
    if let Some((png, what)) = png {
        crate::predict::reconstruction_png(png, what, &m, &aligned)?;
    }
    let mut v = serde_json::to_value(&m).map_err(|e| Error::invalid("evaluate", e.to_string()))?;
    v["stitch"] = serde_json::to_value(cfg.train.stitch).unwrap_or_default();
    if cfg.train.stitch != eval::Stitch::Center {
        v["center_stitch"] = serde_json::to_value(scored(eval::Stitch::Center)?.0).unwrap_or_default();
    }
    Ok(Some(v))
}

/// The test splits `train.eval_seeds` names: the run's data simulated (or read from the cache)
/// with each seed, each checked stitchable.
fn eval_splits(cfg: &Config, say: &mut dyn FnMut(&str)) -> Result<Vec<(u64, NpzSplit)>> {
    cfg.train
        .eval_seeds
        .iter()
        .map(|&seed| {
            let d = crate::config::DataConfig { seed, ..cfg.data.clone() };
            let test = crate::data::load_or_simulate(&d, &mut |m| say(m))?.test;
            eval::check_stitchable(&test)
                .map_err(|e| Error::invalid("train", format!("the evaluation object of data seed {seed} cannot be stitched ({e})")))?;
            Ok((seed, test))
        })
        .collect()
}

/// The final evaluation of a grid-lines run: the run's own test object, or the mean of the
/// objects `train.eval_seeds` names, with their sample standard deviations (`sd`) and each
/// object's scores (`objects`).
fn evaluate(g: &Generator, cfg: &Config, own: &NpzSplit, dev: &Device, dir: &Path, say: &mut dyn FnMut(&str)) -> Result<Option<serde_json::Value>> {
    let png = dir.join("reconstruction.png");
    if cfg.train.eval_seeds.is_empty() {
        return score_object(g, cfg, own, dev, Some((&png, "test object")));
    }
    let mut each = Vec::new();
    for (k, (seed, split)) in eval_splits(cfg, say)?.iter().enumerate() {
        // The figure shows the first evaluation object.
        let what = format!("unseen test object (data seed {seed}; 1 of {})", cfg.train.eval_seeds.len());
        let Some(mut v) = score_object(g, cfg, split, dev, (k == 0).then_some((png.as_path(), what.as_str())))? else { continue };
        v["data_seed"] = serde_json::json!(seed);
        each.push(v);
    }
    if each.is_empty() {
        return Ok(None);
    }
    let mut v = json_stat(&each, false);
    v["sd"] = json_stat(&each, true);
    v["stitch"] = each[0]["stitch"].clone();
    v["objects"] = serde_json::Value::Array(each);
    Ok(Some(v))
}

/// The mean (or, with `sd`, the sample standard deviation) of every number in `vs` at the same
/// place, objects recursed into; what is not a number is left out.
fn json_stat(vs: &[serde_json::Value], sd: bool) -> serde_json::Value {
    use serde_json::Value;
    match &vs[0] {
        Value::Object(first) => {
            let mut out = serde_json::Map::new();
            for (k, f) in first {
                if k == "data_seed" {
                    continue;
                }
                let at: Vec<Value> = vs.iter().map(|v| v[k].clone()).collect();
                match f {
                    Value::Number(_) | Value::Object(_) => {
                        out.insert(k.clone(), json_stat(&at, sd));
                    }
                    _ => {}
                }
            }
            Value::Object(out)
        }
        _ => {
            let x: Vec<f64> = vs.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect();
            let n = x.len() as f64;
            let mean = x.iter().sum::<f64>() / n;
            let value = if sd { (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt() } else { mean };
            serde_json::json!(value)
        }
    }
}

/// The steps the guards acted on, as the legend of loss.png names them, with their colours.
const EVENT_MARKS: [(&str, &[StepOutcome], plotters::style::RGBColor); 5] = [
    ("spike: rolled back", &[StepOutcome::RolledBack], plotters::style::RGBColor(214, 39, 40)),
    ("spike: skipped", &[StepOutcome::SpikeSkipped], plotters::style::RGBColor(255, 127, 14)),
    ("spike: logged", &[StepOutcome::SpikeLogged], plotters::style::RGBColor(148, 103, 189)),
    (
        "non-finite: skipped",
        &[StepOutcome::SkippedBadInput, StepOutcome::SkippedNonfiniteLoss, StepOutcome::SkippedNonfiniteGrad],
        plotters::style::RGBColor(0, 0, 0),
    ),
    ("fp16 overflow: skipped", &[StepOutcome::OverflowSkipped, StepOutcome::OverflowAtFloor], plotters::style::RGBColor(140, 86, 75)),
];

/// The terminal line of a step the guards acted on; None for a step that trained as usual.
fn event_line(r: &StepReport, epoch: usize, trainer: &Trainer) -> Option<String> {
    use StepOutcome::*;
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let spike = || format!("loss spike {} > {} x the recent mean {}", num(r.loss), trainer.spike_factor(), num(r.spike_reference));
    let grad = r.clip.map_or("-".to_string(), |c| format!("{}", c.norm_before));
    let scale = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
    let what = match r.outcome {
        Ok | Accumulated => return None,
        SpikeLogged => format!("{}: logged, training went on (train.spike_action = \"log\")", spike()),
        SpikeSkipped => format!("{}: batch skipped, no update", spike()),
        RolledBack => format!(
            "{}: rolled back to {}, learning rate now {:.2e}",
            spike(),
            match r.rolled_back_to {
                Some(0) | None => "the initial weights".to_string(),
                Some(k) => format!("the weights of epoch {k}'s end"),
            },
            trainer.lr()
        ),
        SkippedBadInput => "non-finite input batch: skipped".into(),
        SkippedNonfiniteLoss => format!("non-finite loss ({}): batch skipped", num(r.loss)),
        SkippedNonfiniteGrad => format!("non-finite gradient (norm {grad}): update skipped"),
        OverflowSkipped => format!("fp16 gradient overflow: update skipped, loss scale {} -> {}", scale(r.loss_scale), scale(r.loss_scale_after)),
        OverflowAtFloor => format!("fp16 gradient overflow at the loss scale's floor ({}): update skipped", scale(r.loss_scale)),
    };
    Some(format!("step {} (epoch {}): {what}", r.step, epoch + 1))
}

/// "2 rolled_back, 1 skipped_nonfinite_loss": the steps of `now` beyond `before` that were not
/// plain updates or accumulations.
pub fn event_counts(before: &BTreeMap<StepOutcome, u64>, now: &BTreeMap<StepOutcome, u64>) -> String {
    now.iter()
        .filter(|(o, _)| !matches!(o, StepOutcome::Ok | StepOutcome::Accumulated))
        .filter_map(|(o, &k)| Some((o, k.checked_sub(*before.get(o).unwrap_or(&0)).filter(|&d| d > 0)?)))
        .map(|(o, d)| format!("{d} {o}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of metrics.csv, the same records as metrics.jsonl for tools that read CSV.
const CSV_COLUMNS: [&str; 13] = [
    "kind",
    "epoch",
    "step",
    "outcome",
    "loss",
    "lr",
    "grad_norm",
    "grad_norm_clipped",
    "loss_scale",
    "spike_reference",
    "steps_end",
    "train_loss",
    "val_loss",
];

/// Writes metrics.csv from the run's records, atomically.
fn write_csv(dir: &Path, records: &[serde_json::Value]) -> Result<()> {
    let mut text = CSV_COLUMNS.join(",");
    text.push('\n');
    for r in records {
        let cells: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| match &r[*c] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    crate::io::write_atomic(&dir.join("metrics.csv"), text.as_bytes())
}

fn plots(dir: &Path, records: &[serde_json::Value]) -> Result<()> {
    let pts = |kind: &str, x: &str, y: &str| -> Vec<(f64, f64)> {
        records.iter().filter(|r| r["kind"] == kind).filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?))).collect()
    };
    use plotters::style::RGBColor;
    let (blue, red, green) = (RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44));
    let val: Vec<(f64, f64)> =
        records.iter().filter(|r| r["kind"] == "epoch").filter_map(|r| Some((r["steps_end"].as_f64()?, r["val_loss"].as_f64()?))).collect();
    // The guards' events, at their loss (a non-finite one at the last finite loss before it).
    let mut last = None;
    let mut events: Vec<(StepOutcome, (f64, f64))> = Vec::new();
    for r in records.iter().filter(|r| r["kind"] == "step") {
        let (Some(step), Ok(outcome)) = (r["step"].as_f64(), serde_json::from_value::<StepOutcome>(r["outcome"].clone())) else { continue };
        let loss = r["loss"].as_f64().filter(|l| l.is_finite() && *l > 0.0);
        if let Some(y) = loss.or(last) {
            events.push((outcome, (step, y)));
        }
        last = loss.or(last);
    }
    let marks: Vec<plot::Marks> = EVENT_MARKS
        .iter()
        .map(|(name, outcomes, color)| plot::Marks {
            name,
            points: events.iter().filter(|(o, _)| outcomes.contains(o)).map(|(_, p)| *p).collect(),
            color: *color,
        })
        .collect();
    plot::lines_marked(
        &dir.join("loss.png"),
        "loss",
        "step (micro-batch)",
        "loss",
        &[
            plot::Series { name: "training loss (per step)", points: pts("step", "step", "loss"), color: blue },
            plot::Series { name: "validation loss (per epoch)", points: val, color: red },
        ],
        &marks,
        true,
    )?;
    plot::lines(
        &dir.join("grad_norm.png"),
        "gradient norm",
        "step (micro-batch)",
        "global norm",
        &[
            plot::Series { name: "before clipping", points: pts("step", "step", "grad_norm"), color: blue },
            plot::Series { name: "after clipping", points: pts("step", "step", "grad_norm_clipped"), color: green },
        ],
        true,
    )?;
    plot::lines(
        &dir.join("lr.png"),
        "learning rate",
        "step (micro-batch)",
        "learning rate",
        &[plot::Series { name: "lr", points: pts("step", "step", "lr"), color: blue }],
        false,
    )
}

/// Warns when the loss scale falls under 16384 or under 1024 (REFERENCE section 4): a scale that
/// keeps falling means the gradients overflow fp16 even unscaled.
fn warn_scale(before: f64, after: f64, say: &mut dyn FnMut(&str)) {
    for limit in [16384.0, 1024.0] {
        if before >= limit && after < limit {
            say(&format!("warning: the fp16 loss scale fell to {after} (under {limit}): gradients keep overflowing"));
        }
    }
}

/// How the epochs of an invocation ended.
enum Ending {
    /// Every epoch asked for ran (or `stop_after_epochs` of them).
    Done,
    Crashed(Crash, String),
    /// A stop was requested; the run is checkpointed where it stopped.
    Interrupted,
    /// Early stopping: the validation loss stopped improving.
    EarlyStopped,
}

/// Refuses, before anything is allocated, a config whose training step cannot fit this machine:
/// the memory plan's peak of the step (`fnokern plan`) against a GPU's free memory, and on the
/// host the plan (CPU training) and the simulated data against the available memory. A
/// `train.memory_limit` budget is the run's business (an `oom` crash), not this check's.
fn check_fits(cfg: &Config, dev: &Device) -> Result<()> {
    let gib = crate::plan::gib;
    let mut plain = cfg.clone();
    plain.train.memory_limit = None;
    let step = crate::plan::step_memory(&plain, &Device::meta())?.peak;
    let data = match cfg.data.workload {
        crate::config::Workload::Gridlines => data::estimated_bytes(&cfg.data),
        crate::config::Workload::Darcy => data::darcy::estimated_bytes(&cfg.darcy),
    };
    let too_big = |need: u64, have: u64, what: &str| {
        Error::invalid(
            "train",
            format!(
                "this run needs about {} ({what}) but the machine has {} available: lower data.n, train.batch_size, model.width or model.depth, \
                 or set model.checkpoint (see `fnokern plan`)",
                gib(need),
                gib(have)
            ),
        )
    };
    let host_need = data + if dev.kind().is_gpu() { 0 } else { step };
    if let Some(have) = crate::device::host_available_bytes() {
        if host_need > have {
            return Err(too_big(host_need, have, if dev.kind().is_gpu() { "the data" } else { "one training step and the data" }));
        }
    }
    if let DeviceKind::Cuda(i) = dev.kind() {
        let free = backend::gpu::probe(i)?.free_bytes as u64;
        if step > free {
            return Err(too_big(step, free, "one training step on the GPU"));
        }
    }
    Ok(())
}

/// The config a checkpoint's run was started with, which must be `cfg` but for `train.epochs`
/// (a run extended, or its horizon kept). Compared as configs, not text: fields added to the
/// config since, at their defaults, do not make a checkpoint unresumable.
fn run_config(state: &TrainState, cfg: &Config, dir: &Path) -> Result<Config> {
    let run_cfg: Config = toml::from_str(&state.config).map_err(|e| crate::io::bad(dir, format!("the run's config in its checkpoint is unreadable: {e}")))?;
    let mut same_epochs = run_cfg.clone();
    same_epochs.train.epochs = cfg.train.epochs;
    let diff = run_dir::config_diff(&same_epochs, cfg);
    if !diff.is_empty() {
        return Err(Error::invalid(
            "resume",
            format!(
                "{} was written with a different config: {}; resume with the run's own (its config.toml), changing at most train.epochs",
                dir.display(),
                diff.join(", ")
            ),
        ));
    }
    Ok(run_cfg)
}

/// Where a resumed run continues: the newest checkpoint that loads (saying which were passed
/// over and why), or None when none does (the run was killed before its first one). A
/// checkpoint of another config is refused, not passed over.
fn resume_point(dir: &Path, cfg: &Config, trainer: &Trainer, say: &mut dyn FnMut(&str)) -> Result<Option<(PathBuf, checkpoint::Checkpoint)>> {
    let found = checkpoint::candidates(dir);
    for (path, state) in &found {
        if let Err(e) = state {
            say(&format!("warning: passing over {}: {e}", path.display()));
        }
    }
    for (path, state) in found.into_iter() {
        let Ok(state) = state else { continue };
        run_config(&state, cfg, dir)?;
        match checkpoint::load(&path, &trainer.model().params) {
            Ok(ck) => return Ok(Some((path, ck))),
            // A checkpoint of another model is the user's mistake, not damage: no fallback.
            Err(e @ Error::BadFile { .. }) if e.to_string().contains("the model needs") || e.to_string().contains("does not belong") => return Err(e),
            // Not damage either: the memory budget (an `oom` crash), not a reason to start over.
            Err(e @ Error::OutOfMemory { .. }) => return Err(e),
            Err(e) => say(&format!("warning: passing over {}: {e}", path.display())),
        }
    }
    Ok(None)
}

/// Watches a run step by step: the crash autopsy's replay ([`crate::autopsy`]). [`train`] runs
/// with none (`()`).
pub trait StepObserver {
    /// Once the trainer is built and restored, before the first step of this invocation.
    fn start(&mut self, _trainer: &mut Trainer) -> Result<()> {
        Ok(())
    }
    /// Before each step.
    fn before_step(&mut self, _trainer: &mut Trainer, _at: &StepAt) -> Result<()> {
        Ok(())
    }
    /// The step's points ([`Trainer::step_traced`]).
    fn point(&mut self, _p: StepPoint) {}
    /// After each step: false ends the run there as if interrupted (checkpointed at the group's end).
    fn after_step(&mut self, _trainer: &Trainer, _report: &StepReport) -> Result<bool> {
        Ok(true)
    }
}

impl StepObserver for () {}

/// Where a step is: its number, its epoch (from 0), its training patterns, and how to build the
/// training batch of any patterns (e.g. one at a time).
pub struct StepAt<'a> {
    pub step: u64,
    pub epoch: usize,
    pub patterns: &'a [usize],
    pub batch_of: &'a dyn Fn(&[usize]) -> Result<data::Batch>,
}

/// Trains as configured, writing the run directory; returns the summary (also in summary.json).
pub fn train(cfg: &Config, opts: &RunOptions, say: &mut dyn FnMut(&str)) -> Result<Summary> {
    train_observed(cfg, opts, &mut (), say)
}

/// [`train`], with `observer` watching every step.
pub fn train_observed(cfg: &Config, opts: &RunOptions, observer: &mut dyn StepObserver, say: &mut dyn FnMut(&str)) -> Result<Summary> {
    let started = Instant::now();
    cfg.validate()?;
    // The device first: a GPU that is not there fails before anything is written.
    let dev = Device::of_kind(cfg.train.device_kind()?)?;
    // A config no machine could train is refused before anything is written.
    check_fits(cfg, &dev)?;
    // The data, and whether the final evaluation can use it, before the directory is touched.
    let ds = RunData::load(cfg, &mut |m| say(m))?;
    let train_idx = subset(ds.train_len(), cfg.train.train_patterns);
    let val_idx = subset(ds.test_len(), cfg.train.test_patterns);
    if train_idx.is_empty() || val_idx.is_empty() {
        return Err(Error::invalid(
            "train",
            format!("the data has {} training and {} test patterns: each split needs at least one", train_idx.len(), val_idx.len()),
        ));
    }
    // The final evaluation's data is checked now, not after the training.
    if cfg.train.evaluate && !cfg.train.eval_seeds.is_empty() {
        eval_splits(cfg, &mut |m| say(m))?;
    }
    if let RunData::Gridlines(d) = &ds {
        if cfg.train.evaluate && cfg.train.eval_seeds.is_empty() && d.test.centres.is_some() && d.test.ground_truth.is_some() {
            eval::check_stitchable(&d.test).map_err(|e| {
                Error::invalid(
                    "train",
                    format!("the test split cannot be stitched for the final evaluation ({e}); set train.evaluate = false to train without it"),
                )
            })?;
        }
    }
    let dir = &opts.out_dir;
    run_dir::refuse_foreign(dir)?;
    let _lock = DirLock::take(dir, "run")?;
    fs::create_dir_all(dir.join("checkpoints")).map_err(|source| Error::Io { path: format!("cannot create the run directory {}", dir.display()), source })?;
    // Holding the lock, any temporary file here is a killed writer's.
    let stale = crate::io::remove_stale_temps(dir) + crate::io::remove_stale_temps(&dir.join("checkpoints"));
    if stale > 0 {
        say(&format!("removed {stale} temporary file(s) that a killed run left"));
    }
    let metrics_path = dir.join("metrics.jsonl");
    let last_path = dir.join("checkpoints/last.safetensors");
    if !opts.resume && (metrics_path.exists() || !checkpoint::candidates(dir).is_empty()) {
        return Err(Error::invalid("train", format!("{} already holds a run: continue it with --resume, or choose another --out", dir.display())));
    }
    let config_toml = toml::to_string(cfg).map_err(|e| Error::invalid("train", e.to_string()))?;
    // The preset the run started from: given, or (resumed by its directory alone) the one its
    // config.toml names, so that a resumed run's summary is the straight run's.
    let preset = opts.preset.clone().or_else(|| if opts.resume { run_dir::preset_of(dir) } else { None });
    let config_file = run_dir::config_file(&config_toml, preset.as_deref());
    if !opts.resume {
        // At once, so that a run killed before its first checkpoint can be resumed by its
        // directory alone.
        crate::io::write_atomic(&dir.join("config.toml"), config_file.as_bytes())?;
    }

    dev.set_memory_limit(cfg.train.memory_limit_bytes()?);
    let batches_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);
    let updates_per_epoch = batches_per_epoch.div_ceil(cfg.train.accumulate);
    let total_updates = (cfg.train.epochs * updates_per_epoch) as u64;
    // An allocation over the memory budget while the run is set up (the model, the probe, the
    // optimiser's state, a checkpoint's tensors) is an `oom` crash before the first step, with its
    // summary, as it is during training.
    let oom_before_training = |e: Error, say: &mut dyn FnMut(&str)| -> Result<Summary> {
        say(&format!("run crashed: {e}"));
        let summary = Summary {
            preset: preset.clone(),
            crashed: true,
            crash_kind: Some(Crash::Oom),
            reason: Some(e.to_string()),
            wall_seconds: started.elapsed().as_secs_f64(),
            ..Summary::default()
        };
        write_summary(dir, &summary)?;
        Ok(summary)
    };
    let built = Generator::for_run(cfg, &dev).and_then(|mut g| ds.prepare(&mut g).map(|()| g)).and_then(|g| {
        let probe = ds.probe(&dev)?;
        Trainer::new(cfg, g, probe.as_ref(), total_updates)
    });
    let mut trainer = match built {
        Ok(t) => t,
        Err(e @ Error::OutOfMemory { .. }) => return oom_before_training(e, say),
        Err(e) => return Err(e),
    };
    // The overlap term's batches pair each pattern with a neighbour.
    let neighbours = (cfg.train.aux_loss == crate::config::AuxLoss::Overlap).then(|| ds.neighbours()).transpose()?;
    let mut state = TrainState {
        epochs_done: 0,
        trainer: trainer.state(),
        best_val: None,
        best_epoch: None,
        first_val: None,
        last_val: None,
        epoch_steps: 0,
        epoch_loss_sum: 0.0,
        epoch_loss_count: 0,
        good_optimizer_updates: None,
        good_points: None,
        wall_seconds: 0.0,
        epochs_without_improvement: 0,
        stopped_early: false,
        config: config_toml.clone(),
    };
    let mut records = Vec::new();
    if opts.resume {
        let point = match resume_point(dir, cfg, &trainer, say) {
            Err(e @ Error::OutOfMemory { .. }) => return oom_before_training(e, say),
            other => other?,
        };
        match point {
            Some((ck_path, ck)) => {
                let run_cfg = run_config(&ck.state, cfg, dir)?;
                if ck.state.epochs_done > cfg.train.epochs {
                    return Err(Error::invalid(
                        "resume",
                        format!("the run has done {} epochs, more than train.epochs = {}", ck.state.epochs_done, cfg.train.epochs),
                    ));
                }
                if ck.state.stopped_early {
                    if let Some(s) = fs::read(dir.join("summary.json")).ok().and_then(|b| serde_json::from_slice::<Summary>(&b).ok()).filter(|s| s.finished) {
                        say(&format!("{} stopped early after {} epochs (train.early_stopping_patience): nothing to do", dir.display(), ck.state.epochs_done));
                        return Ok(s);
                    }
                }
                if ck.state.epochs_done == cfg.train.epochs && run_cfg.train.epochs == cfg.train.epochs {
                    if let Some(s) = fs::read(dir.join("summary.json")).ok().and_then(|b| serde_json::from_slice::<Summary>(&b).ok()).filter(|s| s.finished) {
                        say(&format!("{} has finished all {} epochs: nothing to do (extend it with --set train.epochs=N)", dir.display(), cfg.train.epochs));
                        return Ok(s);
                    }
                }
                trainer.restore(ck.state.trainer.clone(), ck.params, ck.optimizer, ck.good, ck.newest_is_current);
                if ck_path != last_path {
                    // `last` is damaged or older than the checkpoint the run goes on from: it
                    // becomes that checkpoint, as the straight run's `last` was at that point.
                    crate::io::copy_atomic(&ck_path, &last_path)?;
                }
                if run_cfg.train.epochs != cfg.train.epochs {
                    trainer.set_horizon(total_updates);
                    say(&format!(
                        "extending the run from {} to {} epochs: the schedule now spans {total_updates} updates",
                        run_cfg.train.epochs, cfg.train.epochs
                    ));
                }
                state = TrainState { config: config_toml.clone(), ..ck.state };
                let (kept, dropped) = run_dir::truncate_metrics(&metrics_path, trainer.steps(), state.epochs_done)?;
                records = kept;
                if dropped > 0 {
                    say(&format!("warning: dropped {dropped} unreadable line(s) of {}", metrics_path.display()));
                }
                let within = if state.epoch_steps > 0 { format!(" and {} steps of the next", state.epoch_steps) } else { String::new() };
                say(&format!("resumed from {} after epoch {}{within} (step {})", ck_path.display(), state.epochs_done, trainer.steps()));
            }
            None => {
                say(&format!("no complete checkpoint in {}: starting the run from its beginning", dir.display()));
                run_dir::truncate_metrics(&metrics_path, 0, 0)?;
            }
        }
    } else if let Some(src) = &opts.fork {
        let ck = match checkpoint::load(src, &trainer.model().params) {
            Err(e @ Error::OutOfMemory { .. }) => return oom_before_training(e, say),
            other => other?,
        };
        if ck.state.epochs_done >= cfg.train.epochs {
            return Err(Error::invalid(
                "fork",
                format!("{} is after epoch {}: the fork's train.epochs ({}) must be more", src.display(), ck.state.epochs_done, cfg.train.epochs),
            ));
        }
        let changed = toml::from_str::<Config>(&ck.state.config).map(|c| run_dir::config_diff(&c, cfg)).unwrap_or_default();
        trainer.restore(ck.state.trainer.clone(), ck.params, ck.optimizer, ck.good, ck.newest_is_current);
        trainer.set_horizon(total_updates);
        state = TrainState { config: config_toml.clone(), stopped_early: false, epochs_without_improvement: 0, ..ck.state };
        // The history the fork continues: the other run's log up to its checkpoint.
        let source_log = src.parent().and_then(Path::parent).map(|d| d.join("metrics.jsonl")).filter(|p| p.is_file());
        if let Some(log) = source_log {
            crate::io::copy_atomic(&log, &metrics_path)?;
            records = run_dir::truncate_metrics(&metrics_path, trainer.steps(), state.epochs_done)?.0;
        }
        say(&format!(
            "forked from {} after epoch {} (step {}); changed: {}",
            src.display(),
            state.epochs_done,
            trainer.steps(),
            if changed.is_empty() { "nothing".to_string() } else { changed.join(", ") }
        ));
    }
    crate::io::write_atomic(&dir.join("config.toml"), config_file.as_bytes())?;
    let mut log = MetricsLog::open(&metrics_path)?;
    say(&format!(
        "training: {} parameters, {} train / {} validation patterns, batch {}, {} epochs, {} micro-batches per epoch",
        trainer.model().num_params(),
        train_idx.len(),
        val_idx.len(),
        cfg.train.batch_size,
        cfg.train.epochs,
        batches_per_epoch
    ));

    let total_steps = (cfg.train.epochs * batches_per_epoch) as u64;
    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(total_steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{pos}/{len} steps  {msg}  eta {eta} {wide_bar}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(trainer.steps());
        Some(pb)
    } else {
        None
    };
    let base_wall = state.wall_seconds;
    observer.start(&mut trainer)?;
    let observer_stop = std::cell::Cell::new(false);
    let stop_requested = || observer_stop.get() || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let mut ran_epochs = 0;
    let first_step = trainer.steps();
    // Lines on the terminal above the progress bar, or through `say` without one.
    let mut tell = |line: &str| match &bar {
        Some(pb) if !pb.is_hidden() => pb.println(line),
        _ => say(line),
    };
    // Each kind of event is told this many times per invocation, then only counted.
    const TOLD_PER_KIND: u64 = 10;
    let mut told: BTreeMap<StepOutcome, u64> = BTreeMap::new();

    // The epochs run in a closure so that an allocation over the memory budget, wherever it
    // happens, ends the run as an `oom` crash with its summary written, like any other crash.
    let mut run_epochs = || -> Result<Ending> {
        // A run that stopped early and was killed before it had finished resumes to its finish.
        if state.stopped_early {
            return Ok(Ending::EarlyStopped);
        }
        while state.epochs_done < cfg.train.epochs {
            let epoch = state.epochs_done;
            let mut order = train_idx.clone();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.train.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
            // An interrupted epoch continues where it stopped.
            let skip = std::mem::take(&mut state.epoch_steps) as usize;
            let (mut loss_sum, mut loss_count) = (std::mem::take(&mut state.epoch_loss_sum), std::mem::take(&mut state.epoch_loss_count));
            let updates_before = trainer.updates();
            let outcomes_before = trainer.outcomes().clone();
            for (bi, chunk) in order.chunks(cfg.train.batch_size).enumerate().skip(skip) {
                let b = match &neighbours {
                    Some(nb) => ds.paired_batch(nb, chunk, &dev)?,
                    None => ds.batch(true, chunk, &dev)?,
                };
                let batch_of = |idx: &[usize]| ds.batch(true, idx, &dev);
                let at = StepAt { step: trainer.steps(), epoch, patterns: chunk, batch_of: &batch_of };
                observer.before_step(&mut trainer, &at)?;
                let r = trainer.step_traced(b, bi + 1 == batches_per_epoch, &mut |p| observer.point(p))?;
                if !observer.after_step(&trainer, &r)? {
                    observer_stop.set(true);
                }
                if let Some(line) = event_line(&r, epoch, &trainer) {
                    let k = told.entry(r.outcome).or_default();
                    *k += 1;
                    if *k <= TOLD_PER_KIND {
                        tell(&line);
                    }
                    if *k == TOLD_PER_KIND {
                        tell(&format!("({TOLD_PER_KIND} {} events told: more are counted in the epoch lines only)", r.outcome));
                    }
                }
                if let (Some(before), Some(after)) = (r.loss_scale, r.loss_scale_after) {
                    warn_scale(before, after, &mut tell);
                }
                if let (true, Some(l)) = (r.outcome.backpropagated(), r.loss) {
                    loss_sum += l;
                    loss_count += 1;
                }
                let rec = r.record(epoch);
                log.write(&rec)?;
                records.push(rec);
                if let Some(pb) = &bar {
                    pb.set_position(trainer.steps());
                    let rate = (trainer.steps() - first_step) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    let val = state.last_val.map_or(String::new(), |v| format!("  val {v:.4}"));
                    pb.set_message(format!(
                        "{rate:.2} steps/s  epoch {}/{}  loss {:.4}{val}",
                        epoch + 1,
                        cfg.train.epochs,
                        if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN }
                    ));
                }
                let failures = trainer.consecutive_failures();
                if failures >= cfg.train.max_consecutive_failures {
                    let kind = if r.outcome.is_spike() { Crash::Spike } else { Crash::Nonfinite };
                    return Ok(Ending::Crashed(kind, format!("{failures} failed steps in a row (last: {})", r.outcome)));
                }
                // A stop waits for the group's update, then checkpoints mid-epoch (with the
                // rollback point, which is then not the checkpoint's own state).
                if stop_requested() && !trainer.mid_group() && bi + 1 < batches_per_epoch {
                    state.trainer = trainer.state();
                    state.epoch_steps = (bi + 1) as u64;
                    (state.epoch_loss_sum, state.epoch_loss_count) = (loss_sum, loss_count);
                    state.wall_seconds = base_wall + started.elapsed().as_secs_f64();
                    log.sync()?;
                    checkpoint::save(&last_path, &trainer, &state)?;
                    return Ok(Ending::Interrupted);
                }
            }
            // End of epoch: validation, schedule, checkpoints.
            let model = trainer.model();
            let finite_weights = optim::sumsq_each(&model.params.values().iter().collect::<Vec<_>>())?.iter().all(|s| s.is_finite());
            if !finite_weights {
                return Ok(Ending::Crashed(Crash::Nonfinite, "non-finite weights".into()));
            }
            if trainer.updates() == updates_before {
                return Ok(Ending::Crashed(Crash::Nonfinite, format!("epoch {} made no update (every gradient was non-finite or skipped)", epoch + 1)));
            }
            let val = validate_with(model, &trainer.objective(), cfg.train.batch_size, &val_idx, &|chunk| ds.batch(false, chunk, &dev))?;
            if !val.is_finite() {
                return Ok(Ending::Crashed(Crash::Nonfinite, "non-finite validation loss".into()));
            }
            let (good, bound) = trainer.end_epoch(val, epoch + 1, state.best_val);
            let rollbacks = cfg.train.spike_action == crate::config::SpikeAction::Rollback;
            state.first_val.get_or_insert(val);
            state.last_val = Some(val);
            state.epochs_done += 1;
            ran_epochs += 1;
            let train_loss = if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN };
            let mut rec = json!({
                "kind": "epoch", "epoch": epoch, "steps_end": trainer.steps(), "train_loss": train_loss,
                "val_loss": val, "lr": trainer.lr(), "outcomes": trainer.outcomes(),
            });
            if rollbacks {
                rec["rollback_point"] = json!(good);
            }
            log.write(&rec)?;
            log.sync()?;
            records.push(rec);
            let events = event_counts(&outcomes_before, trainer.outcomes());
            let line = format!(
                "epoch {:>3}/{}: train loss {train_loss:.5}  val loss {val:.5}  lr {:.2e}  ({:.0} s){}",
                epoch + 1,
                cfg.train.epochs,
                trainer.lr(),
                started.elapsed().as_secs_f64(),
                if events.is_empty() { String::new() } else { format!("  events: {events}") }
            );
            tell(&line);
            if rollbacks && !good {
                tell(&format!(
                    "epoch {}'s end is not a rollback point: validation loss {val:.5} > {:.5} (train.good_point_factor x the best so far); \
                     a rollback goes to epoch {}'s end",
                    epoch + 1,
                    bound.unwrap_or(f64::NAN),
                    trainer.rollback_target().map_or(0, |p| p.epoch)
                ));
            }
            state.trainer = trainer.state();
            state.wall_seconds = base_wall + started.elapsed().as_secs_f64();
            let patience = cfg.train.early_stopping_patience;
            if patience > 0 {
                let improved = state.best_val.is_none_or(|b| val < b - cfg.train.early_stopping_min_delta);
                state.epochs_without_improvement = if improved { 0 } else { state.epochs_without_improvement + 1 };
                state.stopped_early = state.epochs_without_improvement >= patience && state.epochs_done < cfg.train.epochs;
            }
            if state.best_val.is_none_or(|b| val < b) {
                state.best_val = Some(val);
                state.best_epoch = Some(state.epochs_done);
                checkpoint::save(&dir.join("checkpoints/best.safetensors"), &trainer, &state)?;
            }
            if cfg.train.checkpoint_every > 0 && state.epochs_done.is_multiple_of(cfg.train.checkpoint_every) {
                checkpoint::save(&dir.join(format!("checkpoints/epoch_{}.safetensors", state.epochs_done)), &trainer, &state)?;
            }
            checkpoint::save(&last_path, &trainer, &state)?;
            if let Err(e) = write_csv(dir, &records) {
                tell(&format!("warning: metrics.csv was not written: {e}"));
            }
            if state.stopped_early {
                return Ok(Ending::EarlyStopped);
            }
            if opts.stop_after_epochs.is_some_and(|k| ran_epochs >= k) {
                break;
            }
            if stop_requested() && state.epochs_done < cfg.train.epochs {
                return Ok(Ending::Interrupted);
            }
        }
        Ok(Ending::Done)
    };
    let ending = match run_epochs() {
        Ok(e) => e,
        Err(e @ Error::OutOfMemory { .. }) => Ending::Crashed(Crash::Oom, e.to_string()),
        Err(e) => return Err(e),
    };
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let (crash, interrupted) = match ending {
        Ending::Done => (None, false),
        Ending::EarlyStopped => {
            say(&format!(
                "early stopping after epoch {}: no validation loss below the best ({:.5}, epoch {}) by more than {} for {} epochs",
                state.epochs_done,
                state.best_val.unwrap_or(f64::NAN),
                state.best_epoch.unwrap_or(0),
                cfg.train.early_stopping_min_delta,
                state.epochs_without_improvement
            ));
            if cfg.train.early_stopping_restore_best {
                let best = dir.join("checkpoints/best.safetensors");
                let ck = checkpoint::load(&best, &trainer.model().params)?;
                trainer.set_params(ck.params);
                say(&format!("restored the best epoch's weights (epoch {}) from {}", state.best_epoch.unwrap_or(0), best.display()));
            }
            (None, false)
        }
        Ending::Crashed(kind, why) => {
            say(&format!("run crashed: {why}"));
            (Some((kind, why)), false)
        }
        Ending::Interrupted => {
            say(&format!("interrupted at step {}: checkpointed; continue it with --resume", trainer.steps()));
            (None, true)
        }
    };
    let finished = crash.is_none() && !interrupted && (state.epochs_done >= cfg.train.epochs || state.stopped_early);
    // The results first, then what is optional: the final weights are on disk before the
    // evaluation and the plots, whose failures are warnings. The summary says `finished` only
    // once all of them are written: until then it says `finishing`, and a resume completes them.
    if finished {
        weights::save_model(&dir.join("weights.safetensors"), trainer.model())?;
    }
    // The epoch whose weights the evaluation scores.
    let mut evaluated_epoch =
        Some(if state.stopped_early && cfg.train.early_stopping_restore_best { state.best_epoch.unwrap_or(0) } else { state.epochs_done });
    if finished && cfg.train.evaluate && cfg.train.evaluate_best && state.best_epoch.is_some() && evaluated_epoch != state.best_epoch {
        let best = dir.join("checkpoints/best.safetensors");
        let ck = checkpoint::load(&best, &trainer.model().params)?;
        trainer.set_params(ck.params);
        evaluated_epoch = state.best_epoch;
        say(&format!(
            "evaluating the best epoch's weights (epoch {}, validation loss {:.5})",
            state.best_epoch.unwrap_or(0),
            state.best_val.unwrap_or(f64::NAN)
        ));
    }
    let g = trainer.model();
    let mut summary = Summary {
        preset: preset.clone(),
        finished: false,
        finishing: finished,
        crashed: crash.is_some(),
        crash_kind: crash.as_ref().map(|c| c.0),
        interrupted,
        early_stopped: state.stopped_early,
        reason: crash.map(|c| c.1).or_else(|| interrupted.then(|| format!("interrupted at step {}", trainer.steps()))),
        epochs_done: state.epochs_done,
        steps: trainer.steps(),
        updates: trainer.updates(),
        first_val_loss: state.first_val,
        best_val_loss: state.best_val,
        final_val_loss: state.last_val,
        outcomes: trainer.outcomes().clone(),
        metrics: None,
        evaluated_epoch: evaluated_epoch.filter(|_| finished && cfg.train.evaluate),
        parameters: g.num_params(),
        wall_seconds: base_wall + started.elapsed().as_secs_f64(),
    };
    if finished {
        write_summary(dir, &summary)?;
    }
    if finished && cfg.train.evaluate {
        let scored = match &ds {
            RunData::Gridlines(d) => {
                match cfg.train.eval_seeds.len() {
                    0 => say("evaluating: stitching the test object"),
                    k => say(&format!("evaluating: stitching {k} test objects no choice has seen (data seeds {:?})", cfg.train.eval_seeds)),
                }
                evaluate(g, cfg, &d.test, &dev, dir, &mut |m| say(m))
            }
            RunData::Darcy(d) => {
                say(&format!("evaluating: the {} test samples", d.test.len()));
                let m = workload::evaluate_darcy(g, d, cfg, &dev, dir)?;
                say(&format!(
                    "test: relative L2 {:.5}, relative H1 {:.5} (darcy.png)",
                    m["test_rel_l2"].as_f64().unwrap_or(f64::NAN),
                    m["test_h1"].as_f64().unwrap_or(f64::NAN)
                ));
                Ok(Some(m))
            }
        };
        match scored {
            Ok(m) => summary.metrics = m,
            Err(e) => say(&format!("warning: the final evaluation failed: {e}")),
        }
    }
    if let Err(e) = write_csv(dir, &records) {
        say(&format!("warning: metrics.csv was not written: {e}"));
    }
    if let Err(e) = plots(dir, &records) {
        say(&format!("warning: the plots were not written: {e}"));
    }
    // The summary last: a run that says it finished (or crashed, or was interrupted) has every
    // file it will have.
    summary.finished = finished;
    summary.finishing = false;
    summary.wall_seconds = base_wall + started.elapsed().as_secs_f64();
    write_summary(dir, &summary)?;
    Ok(summary)
}

fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(|e| Error::invalid("summary", e.to_string()))?;
    crate::io::write_atomic(&dir.join("summary.json"), text.as_bytes())
}

/// The final parameters of a finished run (for tests and tools).
pub fn load_final_weights(dir: &Path) -> Result<BTreeMap<String, crate::io::Loaded>> {
    crate::io::load_tensors(&dir.join("weights.safetensors"))
}
