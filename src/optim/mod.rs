//! Optimisers (Adam, AdamW, SGD with momentum and Nesterov), gradient clipping (global norm,
//! value, per-parameter norm, AGC per tensor and unit-wise) and learning-rate schedules.
//!
//! Complex spectral weights are updated as pairs of reals, PyTorch's convention for complex
//! parameters. Updates run in place through the backend, so they follow the parameters' device.

use serde::{Deserialize, Serialize};

use crate::autograd::{ParamRole, ParamStore};
use crate::backend::{self, AdamStep, Reduce, SgdStep};
use crate::config::{ClipKind, OptimizerKind, ScheduleKind, TrainConfig};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What an optimiser carries from update to update: moments (Adam) or momentum buffers (SGD),
/// one slot per parameter, and the update count behind Adam's bias correction. A checkpoint and
/// the rollback snapshot hold exactly this.
#[derive(Clone, Debug, Default)]
pub struct OptimizerState {
    /// Adam's first moment, or SGD's momentum buffer.
    pub m: Vec<Option<Tensor>>,
    /// Adam's second moment.
    pub v: Vec<Option<Tensor>>,
    /// Updates made so far.
    pub updates: u64,
}

/// An optimiser (Adam, AdamW, SGD with momentum or Nesterov) with its settings, taken from the
/// config once, and its state.
pub struct Optimizer {
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    nesterov: bool,
    state: OptimizerState,
}

impl Optimizer {
    pub fn new(cfg: &TrainConfig, params: &ParamStore) -> Optimizer {
        Optimizer {
            kind: cfg.optimizer,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            state: OptimizerState { m: vec![None; params.len()], v: vec![None; params.len()], updates: 0 },
        }
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Continues from `state` (a checkpoint's or the rollback snapshot's).
    pub fn restore(&mut self, state: OptimizerState) {
        self.state = state;
    }

    pub fn updates(&self) -> u64 {
        self.state.updates
    }

    /// One update at rate `lr` of every parameter that has a gradient (Adam: all of them in one
    /// backend call, so one launch on a GPU).
    pub fn step(&mut self, params: &mut ParamStore, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let st = &mut self.state;
        st.updates += 1;
        let zeros = |p: &Tensor| Tensor::zeros(p.shape().clone(), p.dtype(), p.device());
        // Updated in place: the store's tensors are written directly when nobody else holds them.
        let updated = params.values_mut().iter_mut().enumerate().filter_map(|(i, p)| grads.get(i).and_then(Option::as_ref).map(|g| (i, p, g)));
        match self.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let mut moments = Vec::new();
                let mut held = Vec::new();
                for (i, p, g) in updated {
                    let m = st.m[i].take().map_or_else(|| zeros(p), Ok)?;
                    let v = st.v[i].take().map_or_else(|| zeros(p), Ok)?;
                    moments.push((i, m, v));
                    held.push((p, g));
                }
                let mut items: Vec<backend::AdamTensors> =
                    held.into_iter().zip(moments.iter_mut()).map(|((p, g), (_, m, v))| backend::AdamTensors { p, g, m, v }).collect();
                let h = AdamStep {
                    lr,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    weight_decay: self.weight_decay,
                    decoupled: self.kind == OptimizerKind::Adamw,
                    step: st.updates,
                    grad_scale: 1.0,
                };
                backend::adam_step(&mut items, &h)?;
                drop(items);
                for (i, m, v) in moments {
                    st.m[i] = Some(m);
                    st.v[i] = Some(v);
                }
            }
            OptimizerKind::Sgd => {
                for (i, p, g) in updated {
                    let h = SgdStep {
                        lr,
                        momentum: self.momentum,
                        nesterov: self.nesterov,
                        weight_decay: self.weight_decay,
                        first: st.m[i].is_none(),
                        grad_scale: 1.0,
                    };
                    if self.momentum > 0.0 {
                        let mut b = st.m[i].take().map_or_else(|| zeros(p), Ok)?;
                        backend::sgd_step(p, g, Some(&mut b), &h)?;
                        st.m[i] = Some(b);
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
    sumsq_each_on_device(ts)?.map_or(Ok(Vec::new()), |t| t.to_f64_vec())
}

/// The sums of squares of [`sumsq_each`], left on the tensors' device ([ts.len()]; None for no
/// tensors), to be read back with other values in one copy.
pub fn sumsq_each_on_device(ts: &[&Tensor]) -> Result<Option<Tensor>> {
    if ts.is_empty() {
        return Ok(None);
    }
    backend::reduce_each(Reduce::SumSq, ts).map(Some)
}

/// The sum of squares of each slot's tensor (0 for an empty slot), in one reduction.
pub fn sumsq_by_slot(ts: &[Option<Tensor>]) -> Result<Vec<f64>> {
    let present: Vec<(usize, &Tensor)> = ts.iter().enumerate().filter_map(|(i, t)| t.as_ref().map(|t| (i, t))).collect();
    let sums = sumsq_each(&present.iter().map(|(_, t)| *t).collect::<Vec<_>>())?;
    let mut out = vec![0.0; ts.len()];
    for ((i, _), s) in present.iter().zip(sums) {
        out[*i] = s;
    }
    Ok(out)
}

/// sqrt of the sum of squares of every gradient (NaN or inf if any entry is).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let present: Vec<&Tensor> = grads.iter().flatten().collect();
    Ok(sumsq_each(&present)?.iter().sum::<f64>().sqrt())
}

/// Every present gradient times k, in place.
pub(crate) fn scale_all(grads: &mut [Option<Tensor>], k: f64) -> Result<()> {
    for g in grads.iter_mut().flatten() {
        backend::scale_in_place(g, k)?;
    }
    Ok(())
}

/// Gradient clipping as configured (`clip`, `clip_max_norm`, `clip_value`, `agc_*`).
#[derive(Clone, Debug)]
pub struct Clipper {
    kind: ClipKind,
    max_norm: f64,
    value: f64,
    agc_factor: f64,
    agc_eps: f64,
}

impl Clipper {
    pub fn new(cfg: &TrainConfig) -> Clipper {
        Clipper { kind: cfg.clip, max_norm: cfg.clip_max_norm, value: cfg.clip_value, agc_factor: cfg.agc_factor, agc_eps: cfg.agc_eps }
    }

    /// Clips `grads` in place (after any accumulation scaling has been applied).
    ///
    /// The norms never leave the device one tensor at a time: one reduction over every gradient
    /// and one copy back give the norm before clipping (and each tensor's for per-parameter
    /// clipping); global-norm clipping then only scales, so its norm after is the norm before
    /// times the factor. AGC runs one launch per weight that computes its unit norms and rescales
    /// in place. The other kinds measure the norm after clipping with one more reduction. Every
    /// kind writes into the gradients' own buffers, so what clipping allocates does not depend
    /// on the values (the meta device's plan stays the CPU's ledger).
    pub fn clip(&self, grads: &mut [Option<Tensor>], params: &ParamStore) -> Result<ClipReport> {
        let sq = sumsq_each(&grads.iter().flatten().collect::<Vec<_>>())?;
        self.clip_with(grads, params, sq)
    }

    /// [`Clipper::clip`] with the gradients' sums of squares (one per present gradient, in
    /// order) already known: the trainer reads them back together with the step's loss.
    pub fn clip_with(&self, grads: &mut [Option<Tensor>], params: &ParamStore, sq: Vec<f64>) -> Result<ClipReport> {
        let present = grads.iter().flatten().count();
        if sq.len() != present {
            return Err(Error::invalid("clip", format!("{} sums of squares for {present} gradients", sq.len())));
        }
        let before = sq.iter().sum::<f64>().sqrt();
        let after = match self.kind {
            ClipKind::None => return Ok(ClipReport { norm_before: before, norm_after: before }),
            ClipKind::GlobalNorm => {
                // torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), at most 1.
                let coef = self.max_norm / (before + 1e-6);
                if coef < 1.0 {
                    scale_all(grads, coef)?;
                    Some(before * coef)
                } else {
                    Some(before)
                }
            }
            ClipKind::Value => {
                for g in grads.iter_mut().flatten() {
                    backend::clamp(g, self.value)?;
                }
                None
            }
            ClipKind::PerParam => {
                for (g, &s) in grads.iter_mut().flatten().zip(&sq) {
                    let coef = self.max_norm / (s.sqrt() + 1e-6);
                    if coef < 1.0 {
                        backend::scale_in_place(g, coef)?;
                    }
                }
                None
            }
            ClipKind::AgcTensor | ClipKind::AgcUnit => {
                for (id, _, p) in params.iter() {
                    let axis = match (self.kind, params.role(id)) {
                        (ClipKind::AgcTensor, _) => None,
                        (_, Some(ParamRole::Weight { unit_axis })) => Some(unit_axis),
                        // Unit-wise AGC leaves biases, gains and the head alone.
                        _ => continue,
                    };
                    let Some(g) = grads.get_mut(id.0).and_then(|g| g.as_mut()) else { continue };
                    backend::agc(p, g, axis, self.agc_factor, self.agc_eps)?;
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
}

/// What a schedule carries: its horizon and the factor that plateau reductions and rollbacks
/// multiply the scheduled rate by (a checkpoint holds it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScheduleState {
    pub total_updates: u64,
    /// Multiplies the scheduled rate: plateau reductions (and, in checkpoints written before
    /// the rollback cut was temporary, rollbacks).
    pub factor: f64,
    pub best_val: Option<f64>,
    pub bad_epochs: usize,
    /// The last rollback's cut of the rate and the update it was made at: the rate is
    /// multiplied by the cut, climbing back linearly to 1 over `rollback_rewarmup` updates.
    #[serde(default = "one")]
    pub cut: f64,
    #[serde(default)]
    pub cut_at: u64,
}

fn one() -> f64 {
    1.0
}

/// The learning rate over updates (constant, warmup + cosine, step, exponential, plateau), with
/// its settings from the config and its state.
pub struct Schedule {
    kind: ScheduleKind,
    base: f64,
    warmup_frac: f64,
    min_lr_frac: f64,
    step_size: u64,
    step_gamma: f64,
    exp_gamma: f64,
    min_lr: f64,
    plateau_patience: usize,
    plateau_factor: f64,
    rewarmup: u64,
    state: ScheduleState,
}

impl Schedule {
    /// The schedule of `cfg` over a run of `total_updates` updates.
    pub fn new(cfg: &TrainConfig, total_updates: u64) -> Self {
        Schedule {
            kind: cfg.schedule,
            base: cfg.lr,
            warmup_frac: cfg.warmup_frac,
            min_lr_frac: cfg.min_lr_frac,
            step_size: cfg.step_size as u64,
            step_gamma: cfg.step_gamma,
            exp_gamma: cfg.exp_gamma,
            min_lr: cfg.min_lr,
            plateau_patience: cfg.plateau_patience,
            plateau_factor: cfg.plateau_factor,
            rewarmup: cfg.rollback_rewarmup as u64,
            state: ScheduleState { total_updates: total_updates.max(1), factor: 1.0, best_val: None, bad_epochs: 0, cut: 1.0, cut_at: 0 },
        }
    }

    pub fn state(&self) -> &ScheduleState {
        &self.state
    }

    pub fn restore(&mut self, state: ScheduleState) {
        self.state = state;
    }

    /// Sets the horizon to `total_updates` (a run extended with more epochs).
    pub fn set_horizon(&mut self, total_updates: u64) {
        self.state.total_updates = total_updates.max(1);
    }

    /// A rollback at update `u`: the rate there is cut by `k` and climbs back linearly to the
    /// schedule's over `rollback_rewarmup` updates (with 0 the cut stays). A cut made while an
    /// earlier one is still climbing starts from where that one had reached.
    pub fn cut_rate(&mut self, k: f64, u: u64) {
        self.state.cut = self.recovery(u) * k;
        self.state.cut_at = u;
    }

    /// Whether update `u` is still within the last rollback's re-warmup (the rate not yet back).
    pub fn climbing(&self, u: u64) -> bool {
        self.state.cut < 1.0 && u.saturating_sub(self.state.cut_at) < self.rewarmup
    }

    /// The rollback cut's multiplier at update `u`.
    fn recovery(&self, u: u64) -> f64 {
        let st = &self.state;
        if st.cut >= 1.0 || self.rewarmup == 0 {
            return st.cut;
        }
        let since = u.saturating_sub(st.cut_at);
        if since >= self.rewarmup {
            return 1.0;
        }
        st.cut + (1.0 - st.cut) * (since as f64 / self.rewarmup as f64)
    }

    /// The rate of update number `u` (0-based).
    pub fn lr(&self, u: u64) -> f64 {
        let (base, st) = (self.base, &self.state);
        let scheduled = match self.kind {
            ScheduleKind::Constant | ScheduleKind::Plateau => base,
            ScheduleKind::WarmupCosine => {
                let warm = (self.warmup_frac * st.total_updates as f64).round() as u64;
                let floor = self.min_lr_frac * base;
                if u < warm {
                    base * (u + 1) as f64 / warm as f64
                } else {
                    let span = (st.total_updates - warm).max(1) as f64;
                    let t = ((u - warm) as f64 / span).min(1.0);
                    floor + 0.5 * (base - floor) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            ScheduleKind::Step => base * self.step_gamma.powi((u / self.step_size) as i32),
            ScheduleKind::Exponential => base * self.exp_gamma.powf(u as f64),
        };
        let lr = scheduled * st.factor * self.recovery(u);
        if self.kind == ScheduleKind::Plateau {
            lr.max(self.min_lr)
        } else {
            lr
        }
    }

    /// ReduceLROnPlateau (mode min, threshold 1e-4 relative, as PyTorch): after `patience`
    /// epochs without improvement, multiply the rate by `plateau_factor` (not below min_lr).
    pub fn on_epoch(&mut self, val: f64) {
        let st = &mut self.state;
        if self.kind != ScheduleKind::Plateau || !val.is_finite() {
            return;
        }
        match st.best_val {
            Some(b) if val >= b * (1.0 - 1e-4) => {
                st.bad_epochs += 1;
                if st.bad_epochs > self.plateau_patience {
                    st.factor = (st.factor * self.plateau_factor).max(self.min_lr / self.base);
                    st.bad_epochs = 0;
                }
            }
            _ => {
                st.best_val = Some(val);
                st.bad_epochs = 0;
            }
        }
    }
}

/// The auxiliary loss's weight over updates (`aux_weight`, `aux_warmup_steps`,
/// `aux_ramp_steps`): 0, then a linear ramp, then capped.
#[derive(Clone, Copy, Debug)]
pub struct AuxSchedule {
    weight: f64,
    warmup: u64,
    ramp: u64,
}

impl AuxSchedule {
    pub fn new(cfg: &TrainConfig) -> AuxSchedule {
        AuxSchedule { weight: cfg.aux_weight, warmup: cfg.aux_warmup_steps as u64, ramp: cfg.aux_ramp_steps as u64 }
    }

    /// The weight at update `u`.
    pub fn at(&self, u: u64) -> f64 {
        let u = u as f64;
        let (w0, r) = (self.warmup as f64, self.ramp as f64);
        if u < w0 {
            0.0
        } else if r == 0.0 || u >= w0 + r {
            self.weight
        } else {
            self.weight * (u - w0) / r
        }
    }
}

/// fp16's dynamic loss scaler (PyTorch GradScaler's defaults, plus a floor and hysteresis;
/// shared/REFERENCE.md section 4). The loss is multiplied by `scale` before backward and the
/// gradients divided by it before clipping. Only overflowing gradients (finite loss) move the
/// scale down; a non-finite loss is the trainer's business and leaves the scale alone, which
/// avoids the "death spiral" of halving on every broken forward.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScalerState {
    pub scale: f64,
    /// Clean updates since the last change of scale.
    pub clean: u64,
    /// Overflowing updates in a row.
    pub overflows: u32,
}

/// The scaler with its settings (`loss_scale_*` of the config) and its state.
pub struct LossScaler {
    growth_interval: u64,
    hysteresis: u32,
    min: f64,
    state: ScalerState,
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
        LossScaler {
            growth_interval: cfg.loss_scale_growth_interval,
            hysteresis: cfg.loss_scale_hysteresis,
            min: cfg.loss_scale_min,
            state: ScalerState { scale: cfg.loss_scale_init, clean: 0, overflows: 0 },
        }
    }

    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    pub fn state(&self) -> &ScalerState {
        &self.state
    }

    pub fn restore(&mut self, state: ScalerState) {
        self.state = state;
    }

    /// Records one update whose unscaled gradients were finite or not.
    pub fn update(&mut self, finite: bool) -> ScaleEvent {
        let st = &mut self.state;
        if finite {
            st.overflows = 0;
            st.clean += 1;
            if st.clean >= self.growth_interval {
                st.clean = 0;
                // Doubling past f32's range would make every later step overflow.
                st.scale = (st.scale * 2.0).min(f32::MAX as f64 / 2.0);
                return ScaleEvent::Grew;
            }
            return ScaleEvent::Clean;
        }
        st.clean = 0;
        st.overflows += 1;
        let at_floor = st.scale <= self.min;
        let backed_off = st.overflows >= self.hysteresis && !at_floor;
        if backed_off {
            st.overflows = 0;
            st.scale = (st.scale * 0.5).max(self.min);
        }
        ScaleEvent::Overflow { backed_off, at_floor }
    }
}
