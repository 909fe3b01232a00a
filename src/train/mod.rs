//! The training loop: epochs, validation, checkpoints, logs and the run directory, around the
//! one training step of [`step::Trainer`].
//!
//! Each step's outcome is one line of metrics.jsonl. Checkpoints (parameters, optimiser state,
//! trainer state) are written atomically at epoch ends: `last`, `best` and every
//! `checkpoint_every` epochs; `--resume` continues from `last` bit for bit.
//!
//! Run directory: config.toml (resolved), metrics.jsonl, summary.json, checkpoints/, and
//! loss.png, grad_norm.png, lr.png, reconstruction.png.

pub mod parity;
pub mod plot;
pub mod step;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::autograd::{ParamStore, Tape};
use crate::backend;
use crate::config::Config;
use crate::data::{self, npz::NpzSplit};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{self, Metrics};
use crate::io::{io_err, Named};
use crate::model::weights;
use crate::model::Generator;
use crate::ops;
use crate::optim::{self, OptimizerState};
use crate::tensor::{DType, Tensor};

pub use step::{forward_and_loss, Forward, Objective, SpikeGuard, StepOutcome, StepPoint, StepReport, Trainer, TrainerState};

/// How a run is driven (not part of its identity).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub resume: bool,
    /// Stop after this many epochs of this invocation (as if killed), keeping the schedule's horizon.
    pub stop_after_epochs: Option<usize>,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// The preset's name and why it was chosen, for the summary.
    pub preset: Option<String>,
}

/// The run's state at an epoch boundary: all that a checkpoint needs besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub epochs_done: usize,
    /// The step's state: steps, updates, schedule, spike window, loss scaler, outcome counts.
    #[serde(flatten)]
    pub trainer: TrainerState,
    pub best_val: Option<f64>,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    /// The config the run was started with (TOML), to refuse a resume under another.
    pub config: String,
}

/// Why the trainer stopped a run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Crash {
    /// Non-finite inputs, losses, gradients, weights or validation loss.
    Nonfinite,
    /// Loss spikes that kept being skipped or rolled back.
    Spike,
    /// An allocation over the device's memory budget.
    Oom,
}

/// What summary.json holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Summary {
    pub preset: Option<String>,
    pub finished: bool,
    pub crashed: bool,
    /// What stopped a crashed run: `nonfinite`, `spike` or `oom` (see [`Crash`]).
    pub crash_kind: Option<Crash>,
    pub reason: Option<String>,
    pub epochs_done: usize,
    pub steps: u64,
    pub updates: u64,
    pub first_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub outcomes: BTreeMap<StepOutcome, u64>,
    pub metrics: Option<serde_json::Value>,
    pub parameters: usize,
    pub wall_seconds: f64,
}

impl Summary {
    /// Steps whose outcome passes `which` (e.g. [`StepOutcome::is_spike`]).
    pub fn count(&self, which: impl Fn(StepOutcome) -> bool) -> u64 {
        self.outcomes.iter().filter(|(o, _)| which(**o)).map(|(_, n)| n).sum()
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

/// Tensors of a checkpoint: parameters and optimiser state under prefixed names.
fn checkpoint_tensors<'a>(params: &'a ParamStore, opt: &'a OptimizerState) -> Vec<Named<'a>> {
    let mut v = Vec::new();
    for (id, name, t) in params.iter() {
        v.push(Named { name: format!("param.{name}"), tensor: t, complex: false });
        if let Some(m) = &opt.m[id.0] {
            v.push(Named { name: format!("opt_m.{name}"), tensor: m, complex: false });
        }
        if let Some(s) = &opt.v[id.0] {
            v.push(Named { name: format!("opt_v.{name}"), tensor: s, complex: false });
        }
    }
    v
}

fn save_checkpoint(path: &Path, trainer: &Trainer, state: &TrainState) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert("fnokern_state".to_string(), serde_json::to_string(state).map_err(|e| Error::invalid("checkpoint", e.to_string()))?);
    crate::io::save_tensors(path, &checkpoint_tensors(&trainer.model().params, trainer.optimizer_state()), Some(meta))
}

/// Reads a checkpoint into fresh parameter and optimiser values; nothing is changed on error.
fn load_checkpoint(path: &Path, params: &ParamStore) -> Result<(ParamStore, OptimizerState, TrainState)> {
    let bad = |why: String| Error::BadFile { path: path.display().to_string(), why };
    let bytes = fs::read(path).map_err(io_err(path))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a checkpoint (corrupt or truncated): {e}")))?;
    let state: TrainState = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("fnokern_state"))
        .ok_or_else(|| bad("no trainer state in this file: not an fnokern checkpoint".into()))
        .and_then(|s| serde_json::from_str(s).map_err(|e| bad(format!("trainer state unreadable: {e}"))))?;
    let mut file = crate::io::load_tensors(path)?;
    let mut out = params.clone();
    let mut opt = OptimizerState { m: vec![None; params.len()], v: vec![None; params.len()], updates: 0 };
    for (id, name, t) in params.iter() {
        let take = |file: &mut BTreeMap<String, crate::io::Loaded>, key: String, required: bool| -> Result<Option<Tensor>> {
            match file.remove(&key) {
                Some(l) if l.shape == *t.shape() => Ok(Some(l.to_tensor(t.dtype(), t.device())?)),
                Some(l) => Err(bad(format!("`{key}` has shape {} but the model needs {}", l.shape, t.shape()))),
                None if required => Err(bad(format!("`{key}` is missing"))),
                None => Ok(None),
            }
        };
        let p = take(&mut file, format!("param.{name}"), true)?.ok_or_else(|| bad(format!("`param.{name}` is missing")))?;
        out.set(id, p)?;
        opt.m[id.0] = take(&mut file, format!("opt_m.{name}"), false)?;
        opt.v[id.0] = take(&mut file, format!("opt_v.{name}"), false)?;
    }
    if let Some(extra) = file.keys().next() {
        return Err(bad(format!("`{extra}` does not belong to this model")));
    }
    Ok((out, opt, state))
}

/// Appends JSON lines to metrics.jsonl.
struct MetricsLog {
    file: fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(io_err(&self.path))
    }
}

/// Keeps the records of metrics.jsonl up to `steps` micro-batches and `epochs` epochs (a resumed
/// run drops what the crashed one logged after its checkpoint).
fn truncate_metrics(path: &Path, steps: u64, epochs: usize) -> Result<Vec<serde_json::Value>> {
    let mut kept = Vec::new();
    // The kept lines are written back verbatim: a float re-printed after parsing may differ in
    // its last digit.
    let mut text = String::new();
    if let Ok(f) = fs::File::open(path) {
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(io_err(path))?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let keep = match v["kind"].as_str() {
                Some("step") => v["step"].as_u64().is_some_and(|s| s < steps),
                Some("epoch") => v["epoch"].as_u64().is_some_and(|e| (e as usize) < epochs),
                _ => false,
            };
            if keep {
                text.push_str(&line);
                text.push('\n');
                kept.push(v);
            }
        }
    }
    crate::io::write_atomic(path, text.as_bytes())?;
    Ok(kept)
}

/// Mean main loss over a split's patterns `idx`, without gradients.
fn validate(g: &Generator, obj: &Objective, batch_size: usize, split: &NpzSplit, idx: &[usize], dev: &Device) -> Result<f64> {
    let mut total = 0.0;
    for chunk in idx.chunks(batch_size) {
        let b = data::batch(split, chunk, DType::F32, dev)?;
        let mut t = Tape::with_params(&g.params);
        let f = forward_and_loss(&mut t, g, obj, &b, &mut |_| {})?;
        total += f.main.value().scalar_value()? * chunk.len() as f64;
    }
    Ok(total / idx.len().max(1) as f64)
}

/// Predicts the first test object's patches and scores the stitched reconstruction.
fn evaluate(g: &Generator, cfg: &Config, split: &NpzSplit, dev: &Device, dir: &Path) -> Result<Option<Metrics>> {
    if split.centres.is_none() || split.ground_truth.is_none() {
        return Ok(None);
    }
    let n2 = split.n * split.n;
    let (mut amp, mut phase) = (vec![0.0; split.len() * n2], vec![0.0; split.len() * n2]);
    let all: Vec<usize> = match &split.object_index {
        Some(ix) => (0..split.len()).filter(|&i| ix[i] == 0).collect(),
        None => (0..split.len()).collect(),
    };
    for chunk in all.chunks(cfg.train.batch_size) {
        let b = data::batch(split, chunk, DType::F32, dev)?;
        let mut t = Tape::with_params(&g.params);
        let x = t.constant(b.diffraction);
        let out = g.forward(&mut t, &x)?;
        let z = ops::channels_to_complex(&mut t, &out)?;
        let a = backend::complex_abs(z.value())?.to_f64_vec()?;
        let p = backend::complex_angle(z.value())?.to_f64_vec()?;
        for (k, &i) in chunk.iter().enumerate() {
            amp[i * n2..(i + 1) * n2].copy_from_slice(&a[k * n2..(k + 1) * n2]);
            phase[i * n2..(i + 1) * n2].copy_from_slice(&p[k * n2..(k + 1) * n2]);
        }
    }
    let stitched = eval::stitch(split, &amp, &phase)?;
    let (m, aligned) = eval::score(&stitched)?;
    plot::images(
        &dir.join("reconstruction.png"),
        &format!("reconstruction of the test object: amplitude SSIM {:.3}, phase SSIM {:.3}", m.amp_ssim, m.phase_ssim),
        &[
            ("ground-truth amplitude", &aligned.gt_amp),
            ("predicted amplitude", &aligned.pred_amp),
            ("ground-truth phase", &aligned.gt_phase),
            ("predicted phase", &aligned.pred_phase),
        ],
    )?;
    Ok(Some(m))
}

fn plots(dir: &Path, records: &[serde_json::Value]) -> Result<()> {
    let pts = |kind: &str, x: &str, y: &str| -> Vec<(f64, f64)> {
        records.iter().filter(|r| r["kind"] == kind).filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?))).collect()
    };
    use plotters::style::RGBColor;
    let (blue, red, green) = (RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44));
    let val: Vec<(f64, f64)> =
        records.iter().filter(|r| r["kind"] == "epoch").filter_map(|r| Some((r["steps_end"].as_f64()?, r["val_loss"].as_f64()?))).collect();
    plot::lines(
        &dir.join("loss.png"),
        "loss",
        "step (micro-batch)",
        "loss",
        &[
            plot::Series { name: "training loss (per step)", points: pts("step", "step", "loss"), color: blue },
            plot::Series { name: "validation loss (per epoch)", points: val, color: red },
        ],
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

/// Trains as configured, writing the run directory; returns the summary (also in summary.json).
pub fn train(cfg: &Config, opts: &RunOptions, say: &mut dyn FnMut(&str)) -> Result<Summary> {
    let started = Instant::now();
    cfg.validate()?;
    // The device first: a GPU that is not there fails before anything is written.
    let dev = Device::of_kind(cfg.train.device_kind()?)?;
    let dir = &opts.out_dir;
    fs::create_dir_all(dir.join("checkpoints")).map_err(|source| Error::Io { path: format!("cannot create the run directory {}", dir.display()), source })?;
    let metrics_path = dir.join("metrics.jsonl");
    let last_path = dir.join("checkpoints/last.safetensors");
    if !opts.resume && (metrics_path.exists() || last_path.exists()) {
        return Err(Error::invalid("train", format!("{} already holds a run: continue it with --resume, or choose another --out", dir.display())));
    }
    let config_toml = toml::to_string(cfg).map_err(|e| Error::invalid("train", e.to_string()))?;

    dev.set_memory_limit(cfg.train.memory_limit_bytes()?);
    let g = match Generator::for_run(cfg, &dev) {
        Ok(g) => g,
        // Not even the model fits the budget: an `oom` crash before the first step.
        Err(e @ Error::OutOfMemory { .. }) => {
            say(&format!("run crashed: {e}"));
            let summary = Summary {
                preset: opts.preset.clone(),
                crashed: true,
                crash_kind: Some(Crash::Oom),
                reason: Some(e.to_string()),
                wall_seconds: started.elapsed().as_secs_f64(),
                ..Summary::default()
            };
            write_summary(dir, &summary)?;
            return Ok(summary);
        }
        Err(e) => return Err(e),
    };
    let ds = data::load_or_simulate(&cfg.data, &mut |m| say(m))?;
    let train_idx = subset(ds.train.len(), cfg.train.train_patterns);
    let val_idx = subset(ds.test.len(), cfg.train.test_patterns);
    let batches_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);
    let updates_per_epoch = batches_per_epoch.div_ceil(cfg.train.accumulate);
    let probe = data::probe_tensor(&ds.train, DType::F32, &dev)?;
    let mut trainer = Trainer::new(cfg, g, &probe, (cfg.train.epochs * updates_per_epoch) as u64)?;
    let mut state = TrainState { epochs_done: 0, trainer: trainer.state(), best_val: None, first_val: None, last_val: None, config: config_toml.clone() };
    let mut records = Vec::new();
    if opts.resume {
        let (params, opt, s) = load_checkpoint(&last_path, &trainer.model().params)?;
        // Compared as configs, not text: fields added to the config since, at their defaults, do
        // not make a checkpoint unresumable.
        if toml::from_str::<Config>(&s.config).ok().as_ref() != Some(cfg) {
            return Err(Error::invalid(
                "resume",
                format!("{} was written with a different config (see its config.toml); resume with the same one", last_path.display()),
            ));
        }
        trainer.restore(s.trainer.clone(), params, opt);
        state = s;
        records = truncate_metrics(&metrics_path, trainer.steps(), state.epochs_done)?;
        say(&format!("resumed from {} after epoch {} (step {})", last_path.display(), state.epochs_done, trainer.steps()));
    }
    crate::io::write_atomic(&dir.join("config.toml"), config_toml.as_bytes())?;
    let mut log =
        MetricsLog { file: OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io_err(&metrics_path))?, path: metrics_path.clone() };
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
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(trainer.steps());
        Some(pb)
    } else {
        None
    };
    let mut ran_epochs = 0;

    // The epochs run in a closure so that an allocation over the memory budget, wherever it
    // happens, ends the run as an `oom` crash with its summary written, like any other crash.
    let mut run_epochs = || -> Result<Option<(Crash, String)>> {
        while state.epochs_done < cfg.train.epochs {
            let epoch = state.epochs_done;
            let mut order = train_idx.clone();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.train.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
            let (mut loss_sum, mut loss_count) = (0.0, 0usize);
            for (bi, chunk) in order.chunks(cfg.train.batch_size).enumerate() {
                let b = data::batch(&ds.train, chunk, DType::F32, &dev)?;
                let r = trainer.step(b, bi + 1 == batches_per_epoch)?;
                if let (Some(before), Some(after)) = (r.loss_scale, r.loss_scale_after) {
                    warn_scale(before, after, &mut *say);
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
                    pb.set_message(format!("epoch {} loss {:.4}", epoch + 1, if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN }));
                }
                let failures = trainer.consecutive_failures();
                if failures >= cfg.train.max_consecutive_failures {
                    let kind = if r.outcome.is_spike() { Crash::Spike } else { Crash::Nonfinite };
                    return Ok(Some((kind, format!("{failures} failed steps in a row (last: {})", r.outcome))));
                }
            }
            // End of epoch: validation, schedule, checkpoints.
            let model = trainer.model();
            let finite_weights = optim::sumsq_each(&model.params.values().iter().collect::<Vec<_>>())?.iter().all(|s| s.is_finite());
            if !finite_weights {
                return Ok(Some((Crash::Nonfinite, "non-finite weights".into())));
            }
            let val = validate(model, &trainer.objective(), cfg.train.batch_size, &ds.test, &val_idx, &dev)?;
            if !val.is_finite() {
                return Ok(Some((Crash::Nonfinite, "non-finite validation loss".into())));
            }
            trainer.end_epoch(val);
            state.first_val.get_or_insert(val);
            state.last_val = Some(val);
            state.epochs_done += 1;
            ran_epochs += 1;
            let train_loss = if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN };
            let rec = json!({
                "kind": "epoch", "epoch": epoch, "steps_end": trainer.steps(), "train_loss": train_loss,
                "val_loss": val, "lr": trainer.lr(), "outcomes": trainer.outcomes(),
            });
            log.write(&rec)?;
            records.push(rec);
            let line = format!(
                "epoch {:>3}/{}: train loss {train_loss:.5}  val loss {val:.5}  lr {:.2e}  ({:.0} s)",
                epoch + 1,
                cfg.train.epochs,
                trainer.lr(),
                started.elapsed().as_secs_f64()
            );
            match &bar {
                Some(pb) if !pb.is_hidden() => pb.println(&line),
                _ => say(&line),
            }
            state.trainer = trainer.state();
            if state.best_val.is_none_or(|b| val < b) {
                state.best_val = Some(val);
                save_checkpoint(&dir.join("checkpoints/best.safetensors"), &trainer, &state)?;
            }
            if cfg.train.checkpoint_every > 0 && state.epochs_done % cfg.train.checkpoint_every == 0 {
                save_checkpoint(&dir.join(format!("checkpoints/epoch_{}.safetensors", state.epochs_done)), &trainer, &state)?;
            }
            save_checkpoint(&last_path, &trainer, &state)?;
            trainer.mark_good();
            if opts.stop_after_epochs.is_some_and(|k| ran_epochs >= k) {
                break;
            }
        }
        Ok(None)
    };
    let crash = match run_epochs() {
        Ok(c) => c,
        Err(e @ Error::OutOfMemory { .. }) => Some((Crash::Oom, e.to_string())),
        Err(e) => return Err(e),
    };
    if let Some((_, why)) = &crash {
        say(&format!("run crashed: {why}"));
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let finished = crash.is_none() && state.epochs_done >= cfg.train.epochs;
    let g = trainer.model();
    let metrics = if finished && cfg.train.evaluate {
        say("evaluating: stitching the test object");
        evaluate(g, cfg, &ds.test, &dev, dir)?
    } else {
        None
    };
    plots(dir, &records)?;
    if finished {
        weights::save_params(&dir.join("weights.safetensors"), &g.params, None)?;
    }
    let summary = Summary {
        preset: opts.preset.clone(),
        finished,
        crashed: crash.is_some(),
        crash_kind: crash.as_ref().map(|c| c.0),
        reason: crash.map(|c| c.1),
        epochs_done: state.epochs_done,
        steps: trainer.steps(),
        updates: trainer.updates(),
        first_val_loss: state.first_val,
        best_val_loss: state.best_val,
        final_val_loss: state.last_val,
        outcomes: trainer.outcomes().clone(),
        metrics: metrics.map(|m| serde_json::to_value(m).unwrap_or_default()),
        parameters: g.num_params(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
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
