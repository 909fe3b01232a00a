//! What the training loop needs of a workload's data: split sizes, batches, and the final
//! evaluation (the grid lines' stitched test object, or Darcy's test-split errors and field plots).

use std::collections::HashMap;
use std::path::Path;

use crate::autograd::Tape;
use crate::config::{Config, LossKind, Workload};
use crate::data::darcy::{self, DarcyData};
use crate::data::{self, Batch, Dataset, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::Canvas;
use crate::loss::{PairAxis, Pairs};
use crate::model::Generator;
use crate::tensor::{DType, Tensor};
use crate::train::plot::{self, Panel};

/// The training patterns' positions, (object, row, column) each, and the training stride.
pub struct Neighbours {
    key: Vec<(i64, i64, i64)>,
    at: HashMap<(i64, i64, i64), usize>,
    stride: i64,
}

/// A run's data.
pub enum RunData {
    Gridlines(Dataset),
    Darcy(DarcyData),
}

impl RunData {
    /// Simulates or generates the configured workload's data (or reads its cache or files).
    pub fn load(cfg: &Config, say: &mut dyn FnMut(&str)) -> Result<RunData> {
        Ok(match cfg.data.workload {
            Workload::Gridlines => RunData::Gridlines(data::load_or_simulate(&cfg.data, say)?),
            Workload::Darcy => RunData::Darcy(darcy::load_or_generate(&cfg.darcy, &cfg.data.cache_dir, say)?),
        })
    }

    pub fn train_len(&self) -> usize {
        match self {
            RunData::Gridlines(d) => d.train.len(),
            RunData::Darcy(d) => d.train.len(),
        }
    }

    pub fn test_len(&self) -> usize {
        match self {
            RunData::Gridlines(d) => d.test.len(),
            RunData::Darcy(d) => d.test.len(),
        }
    }

    /// Samples `idx` of the training split (`train`) or of the test split, on `dev`.
    pub fn batch(&self, train: bool, idx: &[usize], dev: &Device) -> Result<Batch> {
        match self {
            RunData::Gridlines(d) => data::batch(if train { &d.train } else { &d.test }, idx, DType::F32, dev),
            RunData::Darcy(d) => {
                let split = if train { &d.train } else { &d.test };
                Ok(Batch { input: d.inputs(split, idx, DType::F32, dev)?, target: Target::Field(d.targets(split, idx, DType::F32, dev)?), pairs: None })
            }
        }
    }

    /// Where every training pattern lies, for [`RunData::paired_batch`]: built once per run.
    pub fn neighbours(&self) -> Result<Neighbours> {
        let RunData::Gridlines(d) = self else {
            return Err(Error::invalid("overlap term", "train.aux_loss = \"overlap\" needs the grid-lines workload"));
        };
        let split = &d.train;
        let centres = split.centres.as_ref().ok_or_else(|| Error::invalid("overlap term", "the training split has no patch positions (xcoords, ycoords)"))?;
        let key: Vec<(i64, i64, i64)> =
            (0..split.len()).map(|i| (split.object_index.as_ref().map_or(0, |o| o[i]), centres[i].0.round() as i64, centres[i].1.round() as i64)).collect();
        let at = key.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        // The training stride: the smallest gap between two patch rows.
        let mut rows: Vec<i64> = key.iter().map(|k| k.1).collect();
        rows.sort_unstable();
        rows.dedup();
        let stride = rows.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0);
        if stride <= 0 || stride as usize >= split.n {
            return Err(Error::invalid("overlap term", format!("the training patches (stride {stride}) do not overlap at N = {}", split.n)));
        }
        Ok(Neighbours { key, at, stride })
    }

    /// The training batch of `chunk` for the overlap term (`train.aux_loss = "overlap"`): the
    /// first half of `chunk` are anchors, each paired with its neighbour one training stride
    /// right (or, when the chunk's first pattern is odd, down); an anchor on the last column (row)
    /// becomes the neighbour of the one before it. The batch is [A; B], as [`loss::Pairs`] says.
    pub fn paired_batch(&self, nb: &Neighbours, chunk: &[usize], dev: &Device) -> Result<Batch> {
        let RunData::Gridlines(d) = self else {
            return Err(Error::invalid("overlap term", "train.aux_loss = \"overlap\" needs the grid-lines workload"));
        };
        let axis = if chunk.first().is_some_and(|i| i % 2 == 1) { PairAxis::Rows } else { PairAxis::Cols };
        let step = |(o, r, c): (i64, i64, i64), sign: i64| match axis {
            PairAxis::Rows => (o, r + sign * nb.stride, c),
            PairAxis::Cols => (o, r, c + sign * nb.stride),
        };
        let anchors = &chunk[..(chunk.len() / 2).max(1)];
        let (mut first, mut second) = (Vec::with_capacity(anchors.len()), Vec::with_capacity(anchors.len()));
        for &i in anchors {
            let (a, b) = match (nb.at.get(&step(nb.key[i], 1)), nb.at.get(&step(nb.key[i], -1))) {
                (Some(&j), _) => (i, j),
                (None, Some(&j)) => (j, i),
                (None, None) => return Err(Error::invalid("overlap term", format!("training pattern {i} has no neighbour along {axis:?}"))),
            };
            first.push(a);
            second.push(b);
        }
        first.extend(second);
        let mut b = data::batch(&d.train, &first, DType::F32, dev)?;
        b.pairs = Some(Pairs { axis, shift: nb.stride as usize });
        Ok(b)
    }

    /// The grid lines' probe [N, N, 2] (None for Darcy).
    pub fn probe(&self, dev: &Device) -> Result<Option<Tensor>> {
        match self {
            RunData::Gridlines(d) => Ok(Some(data::probe_tensor(&d.train, DType::F32, dev)?)),
            RunData::Darcy(_) => Ok(None),
        }
    }

    /// Makes the model predict what the data's targets are: the FNO-2D decodes with the training
    /// set's output normaliser.
    pub fn prepare(&self, g: &mut Generator) -> Result<()> {
        match self {
            RunData::Gridlines(_) => Ok(()),
            RunData::Darcy(d) => g.set_output_normalizer(d.y_normalizer.clone()),
        }
    }
}

/// Darcy's final evaluation: the test split's mean relative L2 and H1 errors, and darcy.png with
/// the coefficient, the solution, the prediction and its error for the first test samples.
pub fn evaluate_darcy(g: &Generator, d: &DarcyData, cfg: &Config, dev: &Device, dir: &Path) -> Result<serde_json::Value> {
    let all: Vec<usize> = (0..d.test.len()).collect();
    let (mut l2, mut h1) = (0.0, 0.0);
    let mut shown: Vec<Vec<f64>> = Vec::new();
    const SHOWN: usize = 3;
    for chunk in all.chunks(cfg.train.batch_size) {
        let x = d.inputs(&d.test, chunk, DType::F32, dev)?;
        let u = d.targets(&d.test, chunk, DType::F32, dev)?;
        let mut t = Tape::with_params(&g.params);
        let x = t.constant(x);
        let pred = g.forward(&mut t, &x)?;
        let uv = t.constant(u);
        let n = chunk.len() as f64;
        l2 += crate::loss::field_objective(&mut t, LossKind::RelL2, &pred, &uv)?.value().scalar_value()? * n;
        h1 += crate::loss::field_objective(&mut t, LossKind::H1, &pred, &uv)?.value().scalar_value()? * n;
        if shown.len() < SHOWN {
            let v = pred.value().to_f64_vec()?;
            let s2 = d.test.s * d.test.s;
            shown.extend(v.chunks(s2).take(SHOWN - shown.len()).map(|c| c.to_vec()));
        }
    }
    let count = all.len().max(1) as f64;
    let (l2, h1) = (l2 / count, h1 / count);
    darcy_png(&dir.join("darcy.png"), d, &shown, l2)?;
    Ok(serde_json::json!({"test_rel_l2": l2, "test_h1": h1, "test_samples": all.len(), "s": d.test.s}))
}

/// Rows of (coefficient, solution, prediction, error) for the first test samples.
fn darcy_png(path: &Path, d: &DarcyData, predictions: &[Vec<f64>], l2: f64) -> Result<()> {
    let s = d.test.s;
    let mut canvases: Vec<[Canvas; 4]> = Vec::new();
    for (i, p) in predictions.iter().enumerate() {
        let a: Vec<f64> = d.test.coeff_of(i).iter().map(|&v| v as f64).collect();
        let u: Vec<f64> = d.test.sol_of(i).iter().map(|&v| v as f64).collect();
        let e: Vec<f64> = p.iter().zip(&u).map(|(p, u)| p - u).collect();
        canvases.push([Canvas::new(s, s, a)?, Canvas::new(s, s, u)?, Canvas::new(s, s, p.clone())?, Canvas::new(s, s, e)?]);
    }
    let rows: Vec<Vec<Panel>> = canvases
        .iter()
        .enumerate()
        .map(|(i, [a, u, p, e])| {
            let urange = plot::range_of(&[u, p]);
            let emax = e.data.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
            vec![
                Panel::new(format!("sample {i}: coefficient a"), a, None),
                Panel::new("solution u", u, urange),
                Panel::new("prediction", p, urange),
                Panel { diverging: true, ..Panel::new("error", e, Some((-emax, emax))) },
            ]
        })
        .collect();
    plot::image_grid(path, &format!("Darcy flow, test samples at s = {s}: mean relative L2 error {l2:.4}"), &rows)
}
