//! The training loop, its guards, checkpoints and the run directory.
//!
//! One step = one micro-batch: input check -> forward -> loss (+ curriculum-weighted auxiliary term)
//! -> loss and spike guards -> backward -> accumulate. Every `accumulate` micro-batches: scale,
//! check the gradient, clip, update. Each step's outcome is one line of metrics.jsonl. Checkpoints
//! (params, optimiser state, trainer state) are written atomically at epoch ends: `last`, `best`
//! and every `checkpoint_every` epochs; `--resume` continues from `last` bit for bit.
//!
//! Run directory: config.toml (resolved), metrics.jsonl, summary.json, checkpoints/, and
//! loss.png, grad_norm.png, lr.png, reconstruction.png.

pub mod plot;

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
use crate::config::{AuxLoss, Config, LossConfig, LossKind, SpikeAction};
use crate::data::{self, npz::NpzSplit};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{self, Metrics};
use crate::io::Named;
use crate::loss;
use crate::model::weights;
use crate::model::Generator;
use crate::ops;
use crate::optim::{self, LossScaler, Optimizer, ScaleEvent, Schedule};
use crate::tensor::Precision;
use crate::tensor::{DType, Tensor};

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

/// The trainer's state at an epoch boundary: all that a checkpoint needs besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub epochs_done: usize,
    pub steps: u64,
    pub updates: u64,
    pub schedule: Schedule,
    /// Recent accepted losses (the spike window).
    pub window: Vec<f64>,
    pub best_val: Option<f64>,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    pub consecutive_failures: usize,
    pub outcomes: BTreeMap<String, u64>,
    /// fp16's dynamic loss scaler (None in fp32 and bf16).
    #[serde(default)]
    pub scaler: Option<LossScaler>,
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
    pub outcomes: BTreeMap<String, u64>,
    pub metrics: Option<serde_json::Value>,
    pub parameters: usize,
    pub wall_seconds: f64,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// An evenly spaced subset of 0..n of size k (all when k is 0 or at least n).
fn subset(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || k >= n {
        (0..n).collect()
    } else {
        (0..k).map(|i| i * n / k).collect()
    }
}

fn is_finite_tensor(t: &Tensor) -> Result<bool> {
    Ok(backend::reduce(backend::Reduce::SumSq, t)?.scalar_value()?.is_finite())
}

/// Tensors of a checkpoint: parameters and optimiser state under prefixed names.
fn checkpoint_tensors<'a>(params: &'a ParamStore, opt: &'a Optimizer) -> Vec<Named<'a>> {
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

fn save_checkpoint(path: &Path, params: &ParamStore, opt: &Optimizer, state: &TrainState) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert("fnokern_state".to_string(), serde_json::to_string(state).map_err(|e| Error::invalid("checkpoint", e.to_string()))?);
    crate::io::save_tensors(path, &checkpoint_tensors(params, opt), Some(meta))
}

/// Reads a checkpoint into fresh parameter and optimiser values; nothing is changed on error.
fn load_checkpoint(path: &Path, params: &ParamStore, opt_kind: crate::config::OptimizerKind) -> Result<(ParamStore, Optimizer, TrainState)> {
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
    let mut opt = Optimizer::new(opt_kind, params);
    opt.updates = state.updates;
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

/// Forward pass and configured loss(es) of one batch; returns (total loss, main loss value).
fn batch_loss(
    t: &mut Tape,
    g: &Generator,
    cfg: &Config,
    b: &data::Batch,
    sprobe: &Tensor,
    aux_w: f64,
    nan_forward: bool,
) -> Result<(crate::autograd::Var, f64)> {
    let x = t.constant(b.diffraction.clone());
    let yi = t.constant(b.y_i.clone());
    let yp = t.constant(b.y_phi.clone());
    let mut out = g.forward(t, &x)?;
    if nan_forward {
        out = ops::scale(t, &out, f64::NAN)?;
    }
    let targets = loss::Targets { diffraction: &x, y_i: &yi, y_phi: &yp };
    let main = loss::objective(t, &cfg.loss, &out, &targets, sprobe)?;
    let main_value = main.value().scalar_value()?;
    if cfg.train.aux_loss == AuxLoss::SupervisedL1 && aux_w > 0.0 {
        let aux_cfg = LossConfig { kind: LossKind::SupervisedL1, ..cfg.loss.clone() };
        let aux = loss::objective(t, &aux_cfg, &out, &targets, sprobe)?;
        let aux = ops::scale(t, &aux, aux_w)?;
        return Ok((ops::add(t, &main, &aux)?, main_value));
    }
    Ok((main, main_value))
}

/// Mean main loss over a split's patterns `idx`, without gradients.
fn validate(g: &Generator, cfg: &Config, split: &NpzSplit, idx: &[usize], sprobe: &Tensor, dev: &Device) -> Result<f64> {
    let mut total = 0.0;
    for chunk in idx.chunks(cfg.train.batch_size) {
        let b = data::batch(split, chunk, DType::F32, dev)?;
        let mut t = Tape::with_params(&g.params);
        let (_, v) = batch_loss(&mut t, g, cfg, &b, sprobe, 0.0, false)?;
        total += v * chunk.len() as f64;
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
    let mut g = match Generator::new(&cfg.model, cfg.data.n, 1, &dev, DType::F32) {
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
    g.precision = cfg.train.precision;
    let mut opt = Optimizer::new(cfg.train.optimizer, &g.params);
    let ds = data::load_or_simulate(&cfg.data, &mut |m| say(m))?;
    let train_idx = subset(ds.train.len(), cfg.train.train_patterns);
    let val_idx = subset(ds.test.len(), cfg.train.test_patterns);
    let batches_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);
    let updates_per_epoch = batches_per_epoch.div_ceil(cfg.train.accumulate);
    let mut state = TrainState {
        epochs_done: 0,
        steps: 0,
        updates: 0,
        schedule: Schedule::new((cfg.train.epochs * updates_per_epoch) as u64),
        window: Vec::new(),
        best_val: None,
        first_val: None,
        last_val: None,
        consecutive_failures: 0,
        outcomes: BTreeMap::new(),
        scaler: (cfg.train.precision == Precision::Fp16).then(|| LossScaler::new(&cfg.train)),
        config: config_toml.clone(),
    };
    let mut records = Vec::new();
    if opts.resume {
        let (params, o, s) = load_checkpoint(&last_path, &g.params, cfg.train.optimizer)?;
        // Compared as configs, not text: fields added to the config since, at their defaults, do
        // not make a checkpoint unresumable.
        if toml::from_str::<Config>(&s.config).ok().as_ref() != Some(cfg) {
            return Err(Error::invalid(
                "resume",
                format!("{} was written with a different config (see its config.toml); resume with the same one", last_path.display()),
            ));
        }
        g.params = params;
        opt = o;
        state = s;
        records = truncate_metrics(&metrics_path, state.steps, state.epochs_done)?;
        say(&format!("resumed from {} after epoch {} (step {})", last_path.display(), state.epochs_done, state.steps));
    }
    crate::io::write_atomic(&dir.join("config.toml"), config_toml.as_bytes())?;
    let mut log =
        MetricsLog { file: OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io_err(&metrics_path))?, path: metrics_path.clone() };
    say(&format!(
        "training: {} parameters, {} train / {} validation patterns, batch {}, {} epochs, {} micro-batches per epoch",
        g.num_params(),
        train_idx.len(),
        val_idx.len(),
        cfg.train.batch_size,
        cfg.train.epochs,
        batches_per_epoch
    ));

    let probe = data::probe_tensor(&ds.train, DType::F32, &dev)?;
    let sprobe = loss::scaled_probe(&probe, &cfg.loss)?;
    let mut snapshot = (g.params.clone(), opt.m.clone(), opt.v.clone(), opt.updates);
    let total_steps = (cfg.train.epochs * batches_per_epoch) as u64;
    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(total_steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(state.steps);
        Some(pb)
    } else {
        None
    };
    let mut ran_epochs = 0;

    // The epochs run in a closure so that an allocation over the memory budget, wherever it
    // happens, ends the run as an `oom` crash with its summary written, like any other crash.
    let mut run_epochs = || -> Result<Option<(Crash, String)>> {
        let mut crash: Option<(Crash, String)> = None;
        'epochs: while state.epochs_done < cfg.train.epochs {
            let epoch = state.epochs_done;
            let mut order = train_idx.clone();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.train.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
            let mut acc: Vec<Option<Tensor>> = Vec::new();
            let mut micro = 0usize;
            let (mut loss_sum, mut loss_count) = (0.0, 0usize);
            for (bi, chunk) in order.chunks(cfg.train.batch_size).enumerate() {
                let step = state.steps;
                state.steps += 1;
                let lr = state.schedule.lr(&cfg.train, state.updates);
                let aux_w = optim::aux_weight(&cfg.train, state.updates);
                let mut b = data::batch(&ds.train, chunk, DType::F32, &dev)?;
                if cfg.faults.nan_input_steps.contains(&step) {
                    b.diffraction = Tensor::full(f64::NAN, b.diffraction.shape().clone(), DType::F32, &dev)?;
                }
                let mut rec = json!({"kind": "step", "step": step, "epoch": epoch, "lr": lr});
                if let Some(sc) = &state.scaler {
                    rec["loss_scale"] = json!(sc.scale);
                }
                let outcome: &str = 'step: {
                    if !is_finite_tensor(&b.diffraction)? {
                        break 'step "skipped_bad_input";
                    }
                    let mut t = Tape::with_params(&g.params);
                    let nan_forward = cfg.faults.nan_forward_steps.contains(&step);
                    let (mut loss, _) = batch_loss(&mut t, &g, cfg, &b, &sprobe, aux_w, nan_forward)?;
                    if cfg.faults.spike_steps.contains(&step) {
                        loss = ops::scale(&mut t, &loss, cfg.faults.spike_scale)?;
                    }
                    let lv = loss.value().scalar_value()?;
                    rec["loss"] = json!(lv);
                    if !lv.is_finite() {
                        break 'step "skipped_nonfinite_loss";
                    }
                    let w = &state.window;
                    let spike = w.len() >= 3.min(cfg.train.spike_window) && lv > cfg.train.spike_factor * w.iter().sum::<f64>() / w.len() as f64;
                    if spike {
                        match cfg.train.spike_action {
                            SpikeAction::Log => {}
                            SpikeAction::Skip => break 'step "spike_skipped",
                            SpikeAction::Rollback => {
                                g.params = snapshot.0.clone();
                                opt.m = snapshot.1.clone();
                                opt.v = snapshot.2.clone();
                                opt.updates = snapshot.3;
                                state.schedule.factor *= cfg.train.rollback_lr_factor;
                                acc.clear();
                                micro = 0;
                                break 'step "rolled_back";
                            }
                        }
                    }
                    // fp16: back-propagate the scaled loss so that small gradients survive rounding.
                    let loss_scale = state.scaler.as_ref().map(|s| s.scale);
                    let grads = match loss_scale {
                        Some(s) => {
                            let scaled = ops::scale(&mut t, &loss, s)?;
                            t.backward(&scaled)?.into_params()
                        }
                        None => t.backward(&loss)?.into_params(),
                    };
                    if acc.is_empty() {
                        acc = grads;
                    } else {
                        for (a, gr) in acc.iter_mut().zip(grads) {
                            *a = match (a.take(), gr) {
                                (Some(x), Some(y)) => Some(backend::add_into(x, y)?),
                                (x, y) => x.or(y),
                            };
                        }
                    }
                    micro += 1;
                    state.window.push(lv);
                    if state.window.len() > cfg.train.spike_window {
                        state.window.remove(0);
                    }
                    loss_sum += lv;
                    loss_count += 1;
                    let last_of_epoch = bi + 1 == batches_per_epoch;
                    if micro < cfg.train.accumulate && !last_of_epoch {
                        break 'step if spike { "spike_logged" } else { "accumulated" };
                    }
                    let mut grads = std::mem::take(&mut acc);
                    // Average the micro-batches and undo the loss scale (a power of two: exact).
                    let unscale = 1.0 / (micro as f64 * loss_scale.unwrap_or(1.0));
                    if unscale != 1.0 {
                        for gr in grads.iter_mut().flatten() {
                            *gr = backend::affine(gr, unscale, 0.0)?;
                        }
                    }
                    micro = 0;
                    let report = optim::clip(&cfg.train, &mut grads, &g.params)?;
                    rec["grad_norm"] = json!(report.norm_before);
                    rec["grad_norm_clipped"] = json!(report.norm_after);
                    if !report.norm_before.is_finite() {
                        if let Some(sc) = state.scaler.as_mut() {
                            let before = sc.scale;
                            let event = sc.update(&cfg.train, false);
                            warn_scale(before, sc.scale, &mut *say);
                            if let ScaleEvent::Overflow { at_floor: true, .. } = event {
                                break 'step "overflow_at_floor";
                            }
                            break 'step "overflow_skipped";
                        }
                        break 'step "skipped_nonfinite_grad";
                    }
                    opt.step(&cfg.train, &mut g.params, &grads, lr, 1.0)?;
                    state.updates += 1;
                    if let Some(sc) = state.scaler.as_mut() {
                        sc.update(&cfg.train, true);
                    }
                    if spike {
                        "spike_logged"
                    } else {
                        "ok"
                    }
                };
                rec["outcome"] = json!(outcome);
                *state.outcomes.entry(outcome.to_string()).or_default() += 1;
                // An overflow above the scale's floor is loss scaling working as meant, not a failure.
                let failed = matches!(
                    outcome,
                    "skipped_bad_input" | "skipped_nonfinite_loss" | "skipped_nonfinite_grad" | "overflow_at_floor" | "spike_skipped" | "rolled_back"
                );
                state.consecutive_failures = if failed { state.consecutive_failures + 1 } else { 0 };
                log.write(&rec)?;
                records.push(rec);
                if let Some(pb) = &bar {
                    pb.set_position(state.steps);
                    pb.set_message(format!("epoch {} loss {:.4}", epoch + 1, if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN }));
                }
                if state.consecutive_failures >= cfg.train.max_consecutive_failures {
                    let kind = if matches!(outcome, "spike_skipped" | "rolled_back") { Crash::Spike } else { Crash::Nonfinite };
                    crash = Some((kind, format!("{} failed steps in a row (last: {outcome})", state.consecutive_failures)));
                    break 'epochs;
                }
            }
            // End of epoch: validation, schedule, checkpoints.
            let finite_weights = optim::sumsq_each(&g.params.values().iter().collect::<Vec<_>>())?.iter().all(|s| s.is_finite());
            if !finite_weights {
                crash = Some((Crash::Nonfinite, "non-finite weights".into()));
                break;
            }
            let val = validate(&g, cfg, &ds.test, &val_idx, &sprobe, &dev)?;
            if !val.is_finite() {
                crash = Some((Crash::Nonfinite, "non-finite validation loss".into()));
                break;
            }
            state.schedule.on_epoch(&cfg.train, val);
            state.first_val.get_or_insert(val);
            state.last_val = Some(val);
            state.epochs_done += 1;
            ran_epochs += 1;
            let train_loss = if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN };
            let rec = json!({
                "kind": "epoch", "epoch": epoch, "steps_end": state.steps, "train_loss": train_loss,
                "val_loss": val, "lr": state.schedule.lr(&cfg.train, state.updates), "outcomes": state.outcomes,
            });
            log.write(&rec)?;
            records.push(rec);
            let line = format!(
                "epoch {:>3}/{}: train loss {train_loss:.5}  val loss {val:.5}  lr {:.2e}  ({:.0} s)",
                epoch + 1,
                cfg.train.epochs,
                state.schedule.lr(&cfg.train, state.updates),
                started.elapsed().as_secs_f64()
            );
            match &bar {
                Some(pb) if !pb.is_hidden() => pb.println(&line),
                _ => say(&line),
            }
            if state.best_val.is_none_or(|b| val < b) {
                state.best_val = Some(val);
                save_checkpoint(&dir.join("checkpoints/best.safetensors"), &g.params, &opt, &state)?;
            }
            if cfg.train.checkpoint_every > 0 && state.epochs_done % cfg.train.checkpoint_every == 0 {
                save_checkpoint(&dir.join(format!("checkpoints/epoch_{}.safetensors", state.epochs_done)), &g.params, &opt, &state)?;
            }
            save_checkpoint(&last_path, &g.params, &opt, &state)?;
            snapshot = (g.params.clone(), opt.m.clone(), opt.v.clone(), opt.updates);
            if opts.stop_after_epochs.is_some_and(|k| ran_epochs >= k) {
                break;
            }
        }
        Ok(crash)
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
    let metrics = if finished && cfg.train.evaluate {
        say("evaluating: stitching the test object");
        evaluate(&g, cfg, &ds.test, &dev, dir)?
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
        steps: state.steps,
        updates: state.updates,
        first_val_loss: state.first_val,
        best_val_loss: state.best_val,
        final_val_loss: state.last_val,
        outcomes: state.outcomes.clone(),
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
