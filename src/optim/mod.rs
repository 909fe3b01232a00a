//! Optimisers (Adam, AdamW, SGD with momentum and Nesterov), gradient clipping (global norm,
//! value, per-parameter norm, AGC per tensor and unit-wise) and learning-rate schedules.
//!
//! Complex spectral weights are updated as pairs of reals, PyTorch's convention for complex
//! parameters. Updates run in place through the backend, so they follow the parameters' device.

use serde::{Deserialize, Serialize};

use crate::autograd::{ParamId, ParamRole, ParamStore};
use crate::backend::{self, AdamStep, Reduce, SgdStep};
use crate::config::{ClipKind, OptimizerKind, ScheduleKind, TrainConfig};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Optimiser state: moments (Adam) or momentum buffers (SGD), one slot per parameter.
pub struct Optimizer {
    kind: OptimizerKind,
    /// Adam's first moment, or SGD's momentum buffer.
    pub m: Vec<Option<Tensor>>,
    /// Adam's second moment.
    pub v: Vec<Option<Tensor>>,
    /// Updates made so far.
    pub updates: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &ParamStore) -> Optimizer {
        Optimizer { kind, m: vec![None; params.len()], v: vec![None; params.len()], updates: 0 }
    }

    /// One update of every parameter that has a gradient; `grad_scale` multiplies each gradient.
    pub fn step(&mut self, cfg: &TrainConfig, params: &mut ParamStore, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.updates += 1;
        let ids: Vec<ParamId> = params.iter().map(|(id, _, _)| id).collect();
        for id in ids {
            let Some(g) = grads.get(id.0).and_then(|g| g.as_ref()) else { continue };
            // Updated in place: the store's tensor is written directly when nobody else holds it.
            let p = params.get_mut(id).ok_or_else(|| Error::invalid("optimizer", "parameter vanished"))?;
            let (shape, dtype, dev) = (p.shape().clone(), p.dtype(), p.device().clone());
            let zeros = || Tensor::zeros(shape.clone(), dtype, &dev);
            match self.kind {
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let mut m = match self.m[id.0].take() {
                        Some(m) => m,
                        None => zeros()?,
                    };
                    let mut v = match self.v[id.0].take() {
                        Some(v) => v,
                        None => zeros()?,
                    };
                    let h = AdamStep {
                        lr,
                        beta1: cfg.beta1,
                        beta2: cfg.beta2,
                        eps: cfg.adam_eps,
                        weight_decay: cfg.weight_decay,
                        decoupled: self.kind == OptimizerKind::Adamw,
                        step: self.updates,
                        grad_scale,
                    };
                    backend::adam_step(p, g, &mut m, &mut v, &h)?;
                    self.m[id.0] = Some(m);
                    self.v[id.0] = Some(v);
                }
                OptimizerKind::Sgd => {
                    let h = SgdStep {
                        lr,
                        momentum: cfg.momentum,
                        nesterov: cfg.nesterov,
                        weight_decay: cfg.weight_decay,
                        first: self.m[id.0].is_none(),
                        grad_scale,
                    };
                    if cfg.momentum > 0.0 {
                        let mut b = match self.m[id.0].take() {
                            Some(b) => b,
                            None => zeros()?,
                        };
                        backend::sgd_step(p, g, Some(&mut b), &h)?;
                        self.m[id.0] = Some(b);
                    } else {
                        backend::sgd_step(p, g, None, &h)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Gradient norms before and after clipping.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClipReport {
    pub norm_before: f64,
    pub norm_after: f64,
}

/// The sum of squares of each tensor, computed on their device and read back in one copy.
pub fn sumsq_each(ts: &[&Tensor]) -> Result<Vec<f64>> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    backend::reduce_each(Reduce::SumSq, ts)?.to_f64_vec()
}

/// sqrt of the sum of squares of every gradient (NaN or inf if any entry is).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let present: Vec<&Tensor> = grads.iter().flatten().collect();
    Ok(sumsq_each(&present)?.iter().sum::<f64>().sqrt())
}

fn scale_all(grads: &mut [Option<Tensor>], k: f64) -> Result<()> {
    for g in grads.iter_mut().flatten() {
        *g = backend::affine(g, k, 0.0)?;
    }
    Ok(())
}

/// Clips `grads` in place as configured (after any accumulation scaling has been applied).
///
/// The norms never leave the device one tensor at a time: one reduction over every gradient and
/// one copy back give the norm before clipping (and each tensor's for per-parameter clipping);
/// global-norm clipping then only scales, so its norm after is the norm before times the factor.
/// AGC runs one launch per weight that computes its unit norms and rescales in place. The other
/// kinds measure the norm after clipping with one more reduction.
pub fn clip(cfg: &TrainConfig, grads: &mut [Option<Tensor>], params: &ParamStore) -> Result<ClipReport> {
    let sq = sumsq_each(&grads.iter().flatten().collect::<Vec<_>>())?;
    let before = sq.iter().sum::<f64>().sqrt();
    let after = match cfg.clip {
        ClipKind::None => return Ok(ClipReport { norm_before: before, norm_after: before }),
        ClipKind::GlobalNorm => {
            // torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), at most 1.
            let coef = cfg.clip_max_norm / (before + 1e-6);
            if coef < 1.0 {
                scale_all(grads, coef)?;
                Some(before * coef)
            } else {
                Some(before)
            }
        }
        ClipKind::Value => {
            for g in grads.iter_mut().flatten() {
                backend::clamp(g, cfg.clip_value)?;
            }
            None
        }
        ClipKind::PerParam => {
            for (g, &s) in grads.iter_mut().flatten().zip(&sq) {
                let coef = cfg.clip_max_norm / (s.sqrt() + 1e-6);
                if coef < 1.0 {
                    *g = backend::affine(g, coef, 0.0)?;
                }
            }
            None
        }
        ClipKind::AgcTensor | ClipKind::AgcUnit => {
            for (id, _, p) in params.iter() {
                let axis = match (cfg.clip, params.role(id)) {
                    (ClipKind::AgcTensor, _) => None,
                    (_, Some(ParamRole::Weight { unit_axis })) => Some(unit_axis),
                    // Unit-wise AGC leaves biases, gains and the head alone.
                    _ => continue,
                };
                let Some(g) = grads.get_mut(id.0).and_then(|g| g.as_mut()) else { continue };
                backend::agc(p, g, axis, cfg.agc_factor, cfg.agc_eps)?;
            }
            None
        }
    };
    let after = match after {
        Some(a) => a,
        None => global_norm(grads)?,
    };
    Ok(ClipReport { norm_before: before, norm_after: after })
}

/// The learning rate over updates, with ReduceLROnPlateau's and rollbacks' state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub total_updates: u64,
    /// Multiplies the scheduled rate: plateau reductions and rollbacks.
    pub factor: f64,
    pub best_val: Option<f64>,
    pub bad_epochs: usize,
}

impl Schedule {
    pub fn new(total_updates: u64) -> Self {
        Schedule { total_updates: total_updates.max(1), factor: 1.0, best_val: None, bad_epochs: 0 }
    }

    /// The rate of update number `u` (0-based).
    pub fn lr(&self, cfg: &TrainConfig, u: u64) -> f64 {
        let base = cfg.lr;
        let scheduled = match cfg.schedule {
            ScheduleKind::Constant | ScheduleKind::Plateau => base,
            ScheduleKind::WarmupCosine => {
                let warm = (cfg.warmup_frac * self.total_updates as f64).round() as u64;
                let floor = cfg.min_lr_frac * base;
                if u < warm {
                    base * (u + 1) as f64 / warm as f64
                } else {
                    let span = (self.total_updates - warm).max(1) as f64;
                    let t = ((u - warm) as f64 / span).min(1.0);
                    floor + 0.5 * (base - floor) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            ScheduleKind::Step => base * cfg.step_gamma.powi((u / cfg.step_size as u64) as i32),
            ScheduleKind::Exponential => base * cfg.exp_gamma.powf(u as f64),
        };
        let lr = scheduled * self.factor;
        if cfg.schedule == ScheduleKind::Plateau {
            lr.max(cfg.min_lr)
        } else {
            lr
        }
    }

    /// ReduceLROnPlateau (mode min, threshold 1e-4 relative, as PyTorch): after `patience`
    /// epochs without improvement, multiply the rate by `plateau_factor` (not below min_lr).
    pub fn on_epoch(&mut self, cfg: &TrainConfig, val: f64) {
        if cfg.schedule != ScheduleKind::Plateau || !val.is_finite() {
            return;
        }
        match self.best_val {
            Some(b) if val >= b * (1.0 - 1e-4) => {
                self.bad_epochs += 1;
                if self.bad_epochs > cfg.plateau_patience {
                    self.factor = (self.factor * cfg.plateau_factor).max(cfg.min_lr / cfg.lr);
                    self.bad_epochs = 0;
                }
            }
            _ => {
                self.best_val = Some(val);
                self.bad_epochs = 0;
            }
        }
    }
}

/// The auxiliary loss weight at update `u`: 0, then a linear ramp, then capped.
pub fn aux_weight(cfg: &TrainConfig, u: u64) -> f64 {
    let u = u as f64;
    let (w0, r) = (cfg.aux_warmup_steps as f64, cfg.aux_ramp_steps as f64);
    if u < w0 {
        0.0
    } else if r == 0.0 || u >= w0 + r {
        cfg.aux_weight
    } else {
        cfg.aux_weight * (u - w0) / r
    }
}

/// fp16's dynamic loss scaler (PyTorch GradScaler's defaults, plus a floor and hysteresis;
/// shared/REFERENCE.md section 4). The loss is multiplied by `scale` before backward and the
/// gradients divided by it before clipping. Only overflowing gradients (finite loss) move the
/// scale down; a non-finite loss is the trainer's business and leaves the scale alone, which
/// avoids the "death spiral" of halving on every broken forward.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean updates since the last change of scale.
    pub clean: u64,
    /// Overflowing updates in a row.
    pub overflows: u32,
}

/// What one update did to the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleEvent {
    /// Finite gradients; the scale is unchanged.
    Clean,
    /// Finite gradients, and the interval of clean updates is complete: the scale doubled.
    Grew,
    /// Overflow: the update is skipped; the scale was halved (or held by hysteresis or the floor).
    Overflow { backed_off: bool, at_floor: bool },
}

impl LossScaler {
    pub fn new(cfg: &TrainConfig) -> Self {
        LossScaler { scale: cfg.loss_scale_init, clean: 0, overflows: 0 }
    }

    /// Records one update whose unscaled gradients were finite or not.
    pub fn update(&mut self, cfg: &TrainConfig, finite: bool) -> ScaleEvent {
        if finite {
            self.overflows = 0;
            self.clean += 1;
            if self.clean >= cfg.loss_scale_growth_interval {
                self.clean = 0;
                // Doubling past f32's range would make every later step overflow.
                self.scale = (self.scale * 2.0).min(f32::MAX as f64 / 2.0);
                return ScaleEvent::Grew;
            }
            return ScaleEvent::Clean;
        }
        self.clean = 0;
        self.overflows += 1;
        let at_floor = self.scale <= cfg.loss_scale_min;
        let backed_off = self.overflows >= cfg.loss_scale_hysteresis && !at_floor;
        if backed_off {
            self.overflows = 0;
            self.scale = (self.scale * 0.5).max(cfg.loss_scale_min);
        }
        ScaleEvent::Overflow { backed_off, at_floor }
    }
}
