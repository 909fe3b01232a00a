//! `fnokern grad`: the loss, the generator output and every parameter gradient of one batch, from
//! safetensors in to safetensors out, so that another framework can check parity with fnokern.
//!
//! Batch file (safetensors): `diffraction` f32 [B, 1, N, N] (the input and the observed
//! amplitudes), `probe` complex64 [N, N], and for the supervised loss `Y_I` and `Y_phi`
//! f32 [B, 1, N, N]. Output file: `loss` f32 [], `output` f32 [B, 2, N, N] (real, imaginary
//! channels), and `grad.<parameter name>` for every parameter, in the parameter's own layout
//! (complex64 for spectral weights). Computed on the CPU in f32.
//!
//! Darcy (`data.workload = "darcy"`): the batch file holds `input` f32 [B, 3, s, s] (the normalised
//! coefficient and the grid coordinates, as the model sees them) and `u` f32 [B, 1, s, s]; the
//! weights file may hold the output normaliser (`normalizer.y.mean`, `normalizer.y.scale`), as a
//! finished run's weights.safetensors does; `output` is the decoded prediction [B, 1, s, s] and
//! `loss` the configured loss's per-sample mean.

use std::collections::BTreeMap;
use std::path::Path;

use super::step::{forward_and_loss, Objective};
use crate::autograd::Tape;
use crate::config::{Config, LossKind, Workload};
use crate::data::{Batch, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::Named;
use crate::loss;
use crate::model::{weights, Generator};
use crate::tensor::{DType, Shape, Tensor};

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::BadFile { path: path.display().to_string(), why: why.into() }
}

/// Runs one batch and writes the parity file; returns the loss.
pub fn grad_to_file(cfg: &Config, weights_path: &Path, batch_path: &Path, out_path: &Path) -> Result<f64> {
    let dev = Device::cpu();
    let n = cfg.input_size();
    let mut g = Generator::new(&cfg.model, n, cfg.in_channels(), &dev, DType::F32)?;
    weights::load_params(weights_path, &mut g.params)?;
    let mut file = crate::io::load_tensors(batch_path)?;
    // The trainer's own forward pass and loss (without the auxiliary term, as validation).
    let (batch, sp) = if cfg.data.workload == Workload::Darcy {
        if let Some(norm) = weights::load_normalizer(weights_path, n)? {
            g.set_output_normalizer(norm)?;
        }
        let mut take = |key: &str, c: usize| -> Result<Tensor> {
            let l = file.remove(key).ok_or_else(|| bad(batch_path, format!("tensor `{key}` is missing")))?;
            let d = l.shape.dims().to_vec();
            if l.complex || d.len() != 4 || d[0] == 0 || d[1] != c || d[2] != n || d[3] != n {
                return Err(bad(batch_path, format!("`{key}` has shape {} but must be f32 [B, {c}, {n}, {n}]", l.shape)));
            }
            l.to_tensor(DType::F32, &dev)
        };
        let (input, u) = (take("input", 3)?, take("u", 1)?);
        if input.dims()[0] != u.dims()[0] {
            return Err(bad(batch_path, format!("`input` holds {} samples but `u` {}", input.dims()[0], u.dims()[0])));
        }
        (Batch { input, target: Target::Field(u), pairs: None }, None)
    } else {
        let (b, probe) = ptycho_batch(cfg, &mut file, batch_path, n, &dev)?;
        (b, Some(probe))
    };
    let mut t = Tape::with_params(&g.params);
    let f = forward_and_loss(
        &mut t,
        &g,
        &Objective { loss: &cfg.loss, scaled_probe: sp.as_ref(), aux_weight: 0.0, aux: crate::config::AuxLoss::None },
        &batch,
        &mut |_| {},
    )?;
    let loss_value = f.main.value().reshape(Shape::scalar())?;
    let output = f.output.value().clone();
    let grads = t.backward(&f.main)?;
    // A non-finite result is no parity reference: refused, and nothing is written.
    let finite = |t: &Tensor| -> Result<bool> { Ok(t.to_f64_vec()?.iter().all(|v| v.is_finite())) };
    let mut bad_parts: Vec<String> = Vec::new();
    for (what, t) in [("the loss", &loss_value), ("the output", &output)] {
        if !finite(t)? {
            bad_parts.push(what.to_string());
        }
    }
    for (id, name, _) in g.params.iter() {
        if let Some(gr) = grads.param(id) {
            if !finite(gr)? {
                bad_parts.push(format!("grad.{name}"));
            }
        }
    }
    if !bad_parts.is_empty() {
        let shown = bad_parts.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(
            "grad",
            format!("{shown}{} are not finite: check the weights and the batch (nothing written)", if bad_parts.len() > 3 { ", ..." } else { "" }),
        ));
    }

    let mut named = vec![Named { name: "loss".into(), tensor: &loss_value, complex: false }, Named { name: "output".into(), tensor: &output, complex: false }];
    let zeros: Vec<Tensor> = g.params.iter().map(|(_, _, v)| Tensor::zeros(v.shape().clone(), v.dtype(), v.device())).collect::<Result<_>>()?;
    for (id, name, _) in g.params.iter() {
        named.push(Named { name: format!("grad.{name}"), tensor: grads.param(id).unwrap_or(&zeros[id.0]), complex: weights::is_complex_param(name) });
    }
    let mut meta = BTreeMap::new();
    meta.insert("loss_kind".to_string(), format!("{:?}", cfg.loss.kind));
    meta.insert("config".to_string(), toml::to_string(cfg).unwrap_or_default());
    crate::io::save_tensors(out_path, &named, Some(meta))?;
    loss_value.scalar_value()
}

/// The grid-lines batch of a parity file, and its probe scaled as the loss uses it.
fn ptycho_batch(cfg: &Config, file: &mut BTreeMap<String, crate::io::Loaded>, batch_path: &Path, n: usize, dev: &Device) -> Result<(Batch, Tensor)> {
    let mut take = |key: &str, complex: bool| -> Result<Tensor> {
        let l = file.remove(key).ok_or_else(|| bad(batch_path, format!("tensor `{key}` is missing")))?;
        if l.complex != complex {
            return Err(bad(batch_path, format!("`{key}` must be {}", if complex { "complex64" } else { "real" })));
        }
        l.to_tensor(DType::F32, dev)
    };
    let diffraction = take("diffraction", false)?;
    let d = diffraction.dims().to_vec();
    if d.len() != 4 || d[1] != 1 || d[2] != n || d[3] != n || d[0] == 0 {
        return Err(bad(batch_path, format!("`diffraction` has shape {} but must be [B, 1, {n}, {n}]", diffraction.shape())));
    }
    let probe = take("probe", true)?;
    if probe.dims() != [n, n, 2] {
        return Err(bad(batch_path, format!("`probe` must be complex64 [{n}, {n}]")));
    }
    let (y_i, y_phi) = if cfg.loss.kind == LossKind::SupervisedL1 {
        let (a, b) = (take("Y_I", false)?, take("Y_phi", false)?);
        for (k, t) in [("Y_I", &a), ("Y_phi", &b)] {
            if t.shape() != diffraction.shape() {
                return Err(bad(batch_path, format!("`{k}` has shape {} but `diffraction` {}", t.shape(), diffraction.shape())));
            }
        }
        (a, b)
    } else {
        (diffraction.clone(), diffraction.clone())
    };
    Ok((Batch { input: diffraction, target: Target::Ptycho { y_i, y_phi }, pairs: None }, loss::scaled_probe(&probe, &cfg.loss)?))
}
