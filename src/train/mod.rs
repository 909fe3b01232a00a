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
mod run;
pub mod run_dir;
pub mod step;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::autograd::Tape;
use crate::backend;
use crate::config::Config;
use crate::data::{self, npz::NpzSplit};
use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};
use crate::eval;
use crate::model::Generator;
use crate::parallel::World;
use crate::tensor::DType;

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
    /// The ranks training this run together (one process by default): rank 0 writes the run
    /// directory, every rank trains its share of each round ([`crate::parallel`]).
    pub world: World,
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
    /// The number of ranks that trained it (absent: one), each taking `train.accumulate`
    /// micro-batches of every update.
    #[serde(default)]
    pub world_size: Option<usize>,
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
    /// On several ranks: rank 0's seconds in collectives in this invocation (transfers, and
    /// waits for the slower ranks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collective_seconds: Option<f64>,
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
/// (a run extended, or its horizon kept) and, on another number of ranks than the run's
/// (`world_size` now), `train.accumulate`, as long as an update takes the same micro-batches
/// (accumulate x ranks). Compared as configs, not text: fields added to the config since, at
/// their defaults, do not make a checkpoint unresumable.
fn run_config(state: &TrainState, cfg: &Config, dir: &Path, world_size: usize) -> Result<Config> {
    let run_cfg: Config = toml::from_str(&state.config).map_err(|e| crate::io::bad(dir, format!("the run's config in its checkpoint is unreadable: {e}")))?;
    let mut same_epochs = run_cfg.clone();
    same_epochs.train.epochs = cfg.train.epochs;
    let ranks_then = state.world_size.unwrap_or(1);
    let group_then = run_cfg.train.accumulate * ranks_then;
    if ranks_then != world_size {
        let group_now = cfg.train.accumulate * world_size;
        if group_now != group_then {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{} ran on {ranks_then} rank(s) with train.accumulate = {}: {group_then} micro-batches per update; on {world_size} rank(s) that needs \
                     train.accumulate = {group_then}/{world_size}{}",
                    dir.display(),
                    run_cfg.train.accumulate,
                    if group_then.is_multiple_of(world_size) {
                        String::new()
                    } else {
                        ", which is not a whole number: resume on a number of ranks that divides it".into()
                    }
                ),
            ));
        }
        same_epochs.train.accumulate = cfg.train.accumulate;
    }
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
fn resume_point(
    dir: &Path,
    cfg: &Config,
    trainer: &Trainer,
    world_size: usize,
    say: &mut dyn FnMut(&str),
) -> Result<Option<(PathBuf, checkpoint::Checkpoint)>> {
    let found = checkpoint::candidates(dir);
    for (path, state) in &found {
        if let Err(e) = state {
            say(&format!("warning: passing over {}: {e}", path.display()));
        }
    }
    for (path, state) in found.into_iter() {
        let Ok(state) = state else { continue };
        run_config(&state, cfg, dir, world_size)?;
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
    /// Whether this observer looks at the steps (one that does needs a run in one process).
    fn watches(&self) -> bool {
        true
    }
}

impl StepObserver for () {
    fn watches(&self) -> bool {
        false
    }
}

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

/// [`train`], with `observer` watching every step (one process only). On several ranks
/// (`opts.world`) only rank 0 speaks through `say`.
pub fn train_observed(cfg: &Config, opts: &RunOptions, observer: &mut dyn StepObserver, say: &mut dyn FnMut(&str)) -> Result<Summary> {
    let world = &opts.world;
    if world.size() > 1 && observer.watches() {
        return Err(Error::invalid("train", format!("a run watched step by step (the autopsy's replay) runs in one process, not {} ranks", world.size())));
    }
    let mut quiet = |_: &str| {};
    let say: &mut dyn FnMut(&str) = if world.is_root() { say } else { &mut quiet };
    let mut run = match run::Run::open(cfg, opts, say)? {
        run::Opened::Run(r) => r,
        run::Opened::Ended(s) => return Ok(*s),
    };
    let ending = run.epochs(observer, say)?;
    run.finish(ending, say)
}

/// The mean main loss over the samples `idx` ([`validate_with`]'s), its batches shared out
/// over the ranks (batch i on rank i mod size) and summed in batch order: the same number on any
/// number of ranks.
fn validate_sharded(
    g: &Generator,
    obj: &Objective,
    batch_size: usize,
    idx: &[usize],
    batch: &dyn Fn(&[usize]) -> Result<data::Batch>,
    world: &World,
) -> Result<f64> {
    if world.size() == 1 {
        return validate_with(g, obj, batch_size, idx, batch);
    }
    let (rank, size) = (world.rank(), world.size());
    let chunks: Vec<&[usize]> = idx.chunks(batch_size).collect();
    let mut mine = Vec::new();
    let local = chunks.iter().skip(rank).step_by(size).try_for_each(|chunk| {
        let b = batch(chunk)?;
        let mut t = Tape::with_params(&g.params);
        let f = forward_and_loss(&mut t, g, obj, &b, &mut |_| {})?;
        mine.push(f.main.value().scalar_value()? * chunk.len() as f64);
        Ok(())
    });
    // Status byte 0 and the losses, or 3 and an out-of-memory error (which every rank then ends on).
    let packet = match local {
        Ok(()) => std::iter::once(0u8).chain(mine.iter().flat_map(|v| v.to_le_bytes())).collect::<Vec<u8>>(),
        Err(e @ Error::OutOfMemory { .. }) => std::iter::once(3u8).chain(crate::parallel::oom_bytes(&e)).collect(),
        Err(e) => return Err(e),
    };
    let all = world.all_gather(&packet)?;
    crate::parallel::check_oom(&all, 1)?;
    let all: Vec<Vec<f64>> =
        all.iter().map(|b| b.get(1..).unwrap_or_default().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()).collect();
    let mut total = 0.0;
    for i in 0..chunks.len() {
        total += all
            .get(i % size)
            .and_then(|v| v.get(i / size))
            .ok_or_else(|| Error::invalid("validation", format!("rank {} sent no loss for batch {i}", i % size)))?;
    }
    Ok(total / idx.len().max(1) as f64)
}

fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(|e| Error::invalid("summary", e.to_string()))?;
    crate::io::write_atomic(&dir.join("summary.json"), text.as_bytes())
}

/// The final parameters of a finished run (for tests and tools).
pub fn load_final_weights(dir: &Path) -> Result<BTreeMap<String, crate::io::Loaded>> {
    crate::io::load_tensors(&dir.join("weights.safetensors"))
}
