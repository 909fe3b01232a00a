//! Using a trained model (`fnokern predict`): a run's generator maps diffraction patterns to
//! object patches; where the patterns' positions are known the patches are stitched into the
//! object's canvas, and where the object itself is known the canvas is scored as the training's
//! final evaluation scores it (the same code: [`predict_patches`], [`reconstruction_png`]).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::autograd::Tape;
use crate::backend;
use crate::config::Config;
use crate::data::{self, npz, npz::NpzSplit};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{self, Canvas, Metrics, Stitched};
use crate::model::{weights, Generator};
use crate::ops;
use crate::tensor::DType;
use crate::train::{checkpoint, plot};

/// The predicted object patches of a split: amplitude, phase and (re, im), each [count * N * N]
/// in the split's order.
pub struct Patches {
    pub amp: Vec<f64>,
    pub phase: Vec<f64>,
    pub object: Vec<[f32; 2]>,
}

/// Predicts the patterns `idx` of `split` in batches of `batch_size` (the others stay 0),
/// calling `progress` with the number done after each batch.
pub fn predict_patches(g: &Generator, split: &NpzSplit, idx: &[usize], batch_size: usize, dev: &Device, progress: &mut dyn FnMut(usize)) -> Result<Patches> {
    let n2 = split.n * split.n;
    let total = split.len() * n2;
    let mut p = Patches { amp: vec![0.0; total], phase: vec![0.0; total], object: vec![[0.0; 2]; total] };
    let mut done = 0;
    for chunk in idx.chunks(batch_size.max(1)) {
        let mut t = Tape::with_params(&g.params);
        let x = t.constant(data::inputs(split, chunk, DType::F32, dev)?);
        let out = g.forward(&mut t, &x)?;
        let z = ops::channels_to_complex(&mut t, &out)?;
        let a = backend::complex_abs(z.value())?.to_f64_vec()?;
        let ph = backend::complex_angle(z.value())?.to_f64_vec()?;
        let re_im = z.value().to_f64_vec()?;
        for (k, &i) in chunk.iter().enumerate() {
            p.amp[i * n2..(i + 1) * n2].copy_from_slice(&a[k * n2..(k + 1) * n2]);
            p.phase[i * n2..(i + 1) * n2].copy_from_slice(&ph[k * n2..(k + 1) * n2]);
            for j in 0..n2 {
                let q = 2 * (k * n2 + j);
                p.object[i * n2 + j] = [re_im[q] as f32, re_im[q + 1] as f32];
            }
        }
        done += chunk.len();
        progress(done);
    }
    Ok(p)
}

/// The patterns of a split's first object (object_index 0), the one its ground truth shows.
pub fn first_object(split: &NpzSplit) -> Vec<usize> {
    match &split.object_index {
        Some(ix) => (0..split.len()).filter(|&i| ix[i] == 0).collect(),
        None => (0..split.len()).collect(),
    }
}

/// The reconstruction figure of a scored canvas: truth, prediction and their difference for
/// the amplitude and the phase; truth and prediction share one colour range, so that a flat
/// prediction looks flat.
/// `what` names the object in the title (`test object`, `test object of data seed 1001`).
pub fn reconstruction_png(path: &Path, what: &str, m: &Metrics, aligned: &Stitched) -> Result<()> {
    let diff = |a: &Canvas, b: &Canvas, wrap: bool| Canvas {
        data: a
            .data
            .iter()
            .zip(&b.data)
            .map(|(p, t)| {
                let d = p - t;
                if wrap {
                    d - std::f64::consts::TAU * (d / std::f64::consts::TAU).round()
                } else {
                    d
                }
            })
            .collect(),
        ..a.clone()
    };
    let amp_err = diff(&aligned.pred_amp, &aligned.gt_amp, false);
    let phase_err = diff(&aligned.pred_phase, &aligned.gt_phase, true);
    let sym = |c: &Canvas| plot::range_of(&[c]).map(|(lo, hi)| lo.abs().max(hi.abs()).max(1e-12)).map(|m| (-m, m));
    let amp_range = plot::range_of(&[&aligned.gt_amp, &aligned.pred_amp]);
    let phase_range = plot::range_of(&[&aligned.gt_phase, &aligned.pred_phase]);
    let panel = |name: &str, c, range| plot::Panel::new(name, c, range);
    let error = |name: &str, c| plot::Panel { diverging: true, ..plot::Panel::new(name, c, sym(c)) };
    plot::image_grid(
        path,
        &format!(
            "{what}: amplitude SSIM {:.3} (MAE {:.4}), phase SSIM {:.3} (MAE {:.4})\n\
             truth and prediction share each row's grey scale; errors: blue negative, white 0, red positive",
            m.amp_ssim, m.amp_mae, m.phase_ssim, m.phase_mae
        ),
        &[
            vec![
                panel("true amplitude", &aligned.gt_amp, amp_range),
                panel("predicted amplitude", &aligned.pred_amp, amp_range),
                error("amplitude error (predicted - true)", &amp_err),
            ],
            vec![
                panel("true phase (plane removed)", &aligned.gt_phase, phase_range),
                panel("predicted phase (plane removed)", &aligned.pred_phase, phase_range),
                error("phase error (wrapped)", &phase_err),
            ],
        ],
    )
}

/// Where a prediction's weights come from: a run's final weights, or a checkpoint. Weights with
/// a NaN or an infinity are refused, naming the first such parameter: they predict nothing.
fn load_weights(g: &mut Generator, path: &Path) -> Result<()> {
    if checkpoint::read_state(path).is_ok() {
        g.params = checkpoint::load(path, &g.params)?.params;
    } else {
        weights::load_params(path, &mut g.params)?;
    }
    let params: Vec<&crate::tensor::Tensor> = g.params.values().iter().collect();
    let sums = crate::optim::sumsq_each(&params)?;
    if let Some(((_, name, _), _)) = g.params.iter().zip(&sums).find(|(_, s)| !s.is_finite()) {
        return Err(crate::io::bad(path, format!("parameter `{name}` holds NaN or infinite values: these weights predict nothing")));
    }
    Ok(())
}

/// The weights a prediction of `run` uses when none are named: the finished run's, else its
/// best checkpoint, else its last.
pub fn default_weights(run: &Path) -> Result<PathBuf> {
    ["weights.safetensors", "checkpoints/best.safetensors", "checkpoints/last.safetensors"].iter().map(|p| run.join(p)).find(|p| p.is_file()).ok_or_else(|| {
        Error::invalid("predict", format!("{} holds no weights.safetensors and no checkpoint: train it first (or name --weights)", run.display()))
    })
}

/// What `fnokern predict` is asked to do.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    /// The run directory (its config.toml says which model).
    pub run: PathBuf,
    /// Diffraction patterns (NPZ); None: the run's own test split.
    pub input: Option<PathBuf>,
    /// Weights or a checkpoint; None: [`default_weights`].
    pub weights: Option<PathBuf>,
    pub out: PathBuf,
    pub batch_size: Option<usize>,
}

/// The size of a stitched canvas and where its top-left pixel lies in the object.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CanvasPlace {
    pub rows: usize,
    pub cols: usize,
    pub top: usize,
    pub left: usize,
}

/// What metrics.json of a prediction holds.
#[derive(Clone, Debug, Serialize)]
pub struct PredictReport {
    pub input: String,
    pub weights: String,
    pub patterns: usize,
    pub n: usize,
    /// The run's validation loss on these patterns, when the file holds the targets and probe.
    pub loss: Option<f64>,
    /// The stitched canvas of object 0.
    pub canvas: Option<CanvasPlace>,
    /// The canvas's scores, when the file holds the ground-truth object.
    pub metrics: Option<Metrics>,
    pub seconds: f64,
}

/// Refuses an output directory that exists, holds something, and is not an earlier prediction's
/// (whose metrics.json names its input and weights): a prediction overwrites only its own files.
fn refuse_foreign_out(out: &Path) -> Result<()> {
    let Ok(mut entries) = std::fs::read_dir(out) else { return Ok(()) };
    if entries.next().is_none() {
        return Ok(());
    }
    let ours = std::fs::read(out.join("metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|m| m.get("weights").is_some() && m.get("patterns").is_some());
    if ours {
        return Ok(());
    }
    Err(Error::invalid("predict", format!("{} already holds files that are not an fnokern prediction: choose a new or empty --out", out.display())))
}

/// Runs a prediction: writes prediction.npz, reconstruction.png and metrics.json to `opts.out`.
pub fn predict(opts: &PredictOptions, dev: &Device, say: &mut dyn FnMut(&str)) -> Result<PredictReport> {
    let started = std::time::Instant::now();
    let config_path = opts.run.join("config.toml");
    if !config_path.is_file() {
        return Err(Error::invalid(
            "predict",
            format!("{} is not a run directory (no config.toml): give the directory `fnokern train` wrote", opts.run.display()),
        ));
    }
    let cfg = Config::load(&config_path)?;
    if cfg.data.workload != crate::config::Workload::Gridlines {
        return Err(Error::invalid(
            "predict",
            format!(
                "{} is a Darcy run: its test-split errors are in summary.json and its fields in darcy.png; predict reconstructs grid-lines objects",
                opts.run.display()
            ),
        ));
    }
    refuse_foreign_out(&opts.out)?;
    let weights_path = match &opts.weights {
        Some(w) => w.clone(),
        None => default_weights(&opts.run)?,
    };
    let (split, input) = match &opts.input {
        Some(p) => (npz::load_inputs(p)?, p.display().to_string()),
        None => {
            let ds = data::load_or_simulate(&cfg.data, &mut |m| say(m))?;
            let source = format!("{}/test.npz (the run's test split)", ds.source);
            (ds.test, source)
        }
    };
    if split.n != cfg.data.n {
        return Err(Error::invalid("predict", format!("{input} holds {0} x {0} patterns but the run's model takes {1} x {1} (data.n)", split.n, cfg.data.n)));
    }
    let mut g = Generator::for_run(&cfg, dev)?;
    load_weights(&mut g, &weights_path)?;
    say(&format!("model: {} parameters from {}", g.num_params(), weights_path.display()));
    say(&format!("input: {} patterns of {1} x {1} from {input}", split.len(), split.n));
    let all: Vec<usize> = (0..split.len()).collect();
    let batch = opts.batch_size.unwrap_or(cfg.train.batch_size);
    let bar = indicatif::ProgressBar::new(split.len() as u64);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let p = predict_patches(&g, &split, &all, batch, dev, &mut |k| bar.set_position(k as u64))?;
    bar.finish_and_clear();

    std::fs::create_dir_all(&opts.out).map_err(crate::io::io_err(&opts.out))?;
    let loss = if split.has_targets() {
        let probe = data::probe_tensor(&split, DType::F32, dev)?;
        let sp = crate::loss::scaled_probe(&probe, &cfg.loss)?;
        let obj = crate::train::Objective { loss: &cfg.loss, scaled_probe: Some(&sp), aux_weight: 0.0, aux: crate::config::AuxLoss::None };
        Some(crate::train::validate(&g, &obj, batch, &split, &all, dev)?)
    } else {
        None
    };
    let placed = match eval::place_as(cfg.train.stitch, &split, &p.amp, &p.phase, &p.object) {
        Ok(c) => Some(c),
        // A file without the probe: the reference's stitching needs none.
        Err(e) if cfg.train.stitch != eval::Stitch::Center && split.probe.is_empty() => {
            say(&format!("{e}: stitching the patches' centres instead"));
            eval::place(&split, &p.amp, &p.phase).ok()
        }
        Err(_) => None,
    };
    let scored = match (&placed, &split.ground_truth) {
        (Some(c), Some(_)) => Some(eval::score(&eval::beside_truth(&split, c.clone())?)?),
        _ => None,
    };

    let (count, n) = (split.len() as u64, split.n as u64);
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (amp, phase) = (f32s(&p.amp), f32s(&p.phase));
    let mut arrays = vec![
        npz::Array::F32("amplitude", vec![count, n, n], &amp),
        npz::Array::F32("phase", vec![count, n, n], &phase),
        npz::Array::C64("object", vec![count, n, n], &p.object),
    ];
    let canvas = placed.as_ref().map(|c| (f32s(&c.amp.data), f32s(&c.phase.data), [c.top_left.0 as i64, c.top_left.1 as i64]));
    if let (Some(c), Some((ca, cp, tl))) = (&placed, &canvas) {
        let shape = vec![c.amp.rows as u64, c.amp.cols as u64];
        arrays.push(npz::Array::F32("canvas_amplitude", shape.clone(), ca));
        arrays.push(npz::Array::F32("canvas_phase", shape, cp));
        arrays.push(npz::Array::I64("canvas_top_left", vec![2], tl));
    }
    npz::save_arrays(&opts.out.join("prediction.npz"), &arrays)?;

    let png = opts.out.join("reconstruction.png");
    match (&scored, &placed) {
        (Some((m, aligned)), _) => reconstruction_png(&png, "test object", m, aligned)?,
        (None, Some(c)) => plot::image_grid(
            &png,
            "stitched prediction of object 0 (no ground truth in the input)",
            &[vec![plot::Panel::new("predicted amplitude", &c.amp, None), plot::Panel::new("predicted phase", &c.phase, None)]],
        )?,
        (None, None) => {
            // No positions: the first patches side by side.
            let n2 = split.n * split.n;
            let shown = split.len().min(6);
            let patch = |v: &[f64], i: usize| Canvas::new(split.n, split.n, v[i * n2..(i + 1) * n2].to_vec());
            let amps = (0..shown).map(|i| patch(&p.amp, i)).collect::<Result<Vec<_>>>()?;
            let phases = (0..shown).map(|i| patch(&p.phase, i)).collect::<Result<Vec<_>>>()?;
            let (ar, pr) = (plot::range_of(&amps.iter().collect::<Vec<_>>()), plot::range_of(&phases.iter().collect::<Vec<_>>()));
            plot::image_grid(
                &png,
                &format!("predicted patches 0..{shown} (the input has no patch positions to stitch them)"),
                &[
                    amps.iter().enumerate().map(|(i, c)| plot::Panel::new(format!("amplitude {i}"), c, ar)).collect(),
                    phases.iter().enumerate().map(|(i, c)| plot::Panel::new(format!("phase {i}"), c, pr)).collect(),
                ],
            )?
        }
    }
    let report = PredictReport {
        input,
        weights: weights_path.display().to_string(),
        patterns: split.len(),
        n: split.n,
        loss,
        canvas: placed.as_ref().map(|c| CanvasPlace { rows: c.amp.rows, cols: c.amp.cols, top: c.top_left.0, left: c.top_left.1 }),
        metrics: scored.map(|(m, _)| m),
        seconds: started.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::invalid("predict", e.to_string()))?;
    crate::io::write_atomic(&opts.out.join("metrics.json"), text.as_bytes())?;
    Ok(report)
}
