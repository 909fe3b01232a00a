//! The training step, one for every caller: `fnokern train`'s epochs, `fnokern plan`'s step on the
//! meta device, the step-time benchmark and `fnokern grad` (its forward and loss).
//!
//! One step = one micro-batch: input check -> forward -> loss (+ curriculum-weighted auxiliary
//! term) -> loss and spike guards -> backward -> accumulate. Every `accumulate` micro-batches (or
//! when the caller ends a group early, at the end of an epoch): average and unscale, clip, check
//! the gradient, update. The [`Trainer`] owns every component with its settings and state (the
//! optimiser, the schedule, the fp16 loss scaler, the spike guard and the rollback snapshot); its
//! [`TrainerState`] and the optimiser's tensors are what a checkpoint holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::autograd::{ActivationProbe, ParamStore, Tape, Var};
use crate::backend;
use crate::config::{AuxLoss, Config, FaultConfig, LossConfig, LossKind, Reduction, SpikeAction, TrainConfig};
use crate::data::{Batch, Target};
use crate::error::{Error, Result};
use crate::loss;
use crate::model::Generator;
use crate::ops;
use crate::optim::{self, AuxSchedule, ClipReport, Clipper, LossScaler, Optimizer, OptimizerState, ScaleEvent, ScalerState, Schedule, ScheduleState};
use crate::parallel::{check_oom, oom_bytes, World};
use crate::tensor::{Precision, Tensor};

/// What one step did; metrics.jsonl and summary.json spell it in snake case (`ok`,
/// `skipped_nonfinite_loss`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The parameters were updated.
    Ok,
    /// The gradient was accumulated; the update comes with a later micro-batch.
    Accumulated,
    /// A loss spike, logged (`spike_action = "log"`); the step went on (accumulated or updated).
    SpikeLogged,
    /// The input batch was not finite; nothing was computed.
    SkippedBadInput,
    /// The loss was not finite; no backward pass.
    SkippedNonfiniteLoss,
    /// The gradient was not finite (fp32, bf16); no update.
    SkippedNonfiniteGrad,
    /// fp16: the scaled gradient overflowed; no update, the scale backs off.
    OverflowSkipped,
    /// fp16: the gradient overflowed with the scale at its floor.
    OverflowAtFloor,
    /// A loss spike, skipped (`spike_action = "skip"`).
    SpikeSkipped,
    /// A loss spike: parameters and optimiser state went back to the last good epoch end, and
    /// the learning rate down by `rollback_lr_factor`.
    RolledBack,
}

impl StepOutcome {
    pub const ALL: [StepOutcome; 10] = [
        StepOutcome::Ok,
        StepOutcome::Accumulated,
        StepOutcome::SpikeLogged,
        StepOutcome::SkippedBadInput,
        StepOutcome::SkippedNonfiniteLoss,
        StepOutcome::SkippedNonfiniteGrad,
        StepOutcome::OverflowSkipped,
        StepOutcome::OverflowAtFloor,
        StepOutcome::SpikeSkipped,
        StepOutcome::RolledBack,
    ];

    /// A step that counts towards `max_consecutive_failures`. An overflow above the scale's floor
    /// is loss scaling working as meant, and a logged spike went on to train: neither fails.
    pub fn is_failure(self) -> bool {
        use StepOutcome::*;
        matches!(self, SkippedBadInput | SkippedNonfiniteLoss | SkippedNonfiniteGrad | OverflowAtFloor | SpikeSkipped | RolledBack)
    }

    /// A step the spike guard caught, whatever it did about it.
    pub fn is_spike(self) -> bool {
        matches!(self, StepOutcome::SpikeLogged | StepOutcome::SpikeSkipped | StepOutcome::RolledBack)
    }

    /// A step that met a non-finite input, loss or gradient (fp16 overflows included).
    pub fn is_nonfinite(self) -> bool {
        use StepOutcome::*;
        matches!(self, SkippedBadInput | SkippedNonfiniteLoss | SkippedNonfiniteGrad | OverflowSkipped | OverflowAtFloor)
    }

    /// The step's gradient was computed (and its loss counts in the epoch's training loss).
    pub fn backpropagated(self) -> bool {
        use StepOutcome::*;
        matches!(self, Ok | Accumulated | SpikeLogged | SkippedNonfiniteGrad | OverflowSkipped | OverflowAtFloor)
    }

    /// The word metrics.jsonl uses.
    pub fn as_str(self) -> &'static str {
        use StepOutcome::*;
        match self {
            Ok => "ok",
            Accumulated => "accumulated",
            SpikeLogged => "spike_logged",
            SkippedBadInput => "skipped_bad_input",
            SkippedNonfiniteLoss => "skipped_nonfinite_loss",
            SkippedNonfiniteGrad => "skipped_nonfinite_grad",
            OverflowSkipped => "overflow_skipped",
            OverflowAtFloor => "overflow_at_floor",
            SpikeSkipped => "spike_skipped",
            RolledBack => "rolled_back",
        }
    }
}

impl std::fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one step did and measured: a line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step's number (micro-batches since the run began, from 0).
    pub step: u64,
    pub outcome: StepOutcome,
    /// The learning rate an update at this step uses.
    pub lr: f64,
    /// The loss (with its auxiliary term), when the forward pass ran.
    pub loss: Option<f64>,
    /// Gradient norms, when the step ended a group of micro-batches.
    pub clip: Option<ClipReport>,
    /// fp16: the loss scale the step ran with, and after it.
    pub loss_scale: Option<f64>,
    pub loss_scale_after: Option<f64>,
    /// A spike: the mean of the recent losses its loss was compared with.
    pub spike_reference: Option<f64>,
    /// A rollback: the epoch whose end it went back to (0: the initial weights).
    pub rolled_back_to: Option<usize>,
    /// `train.log_layers`: each part's gradient norm before clipping, at an update.
    pub layer_grad_norms: Option<Vec<f64>>,
}

impl StepReport {
    /// The metrics.jsonl record of this step in `epoch`.
    pub fn record(&self, epoch: usize) -> serde_json::Value {
        let mut rec = json!({"kind": "step", "step": self.step, "epoch": epoch, "lr": self.lr, "outcome": self.outcome});
        if let Some(s) = self.loss_scale {
            rec["loss_scale"] = json!(s);
        }
        if let Some(l) = self.loss {
            rec["loss"] = json!(l);
        }
        if let Some(m) = self.spike_reference {
            rec["spike_reference"] = json!(m);
        }
        if let Some(k) = self.rolled_back_to {
            rec["rolled_back_to_epoch"] = json!(k);
        }
        if let Some(c) = self.clip {
            rec["grad_norm"] = json!(c.norm_before);
            rec["grad_norm_clipped"] = json!(c.norm_after);
        }
        if let Some(n) = &self.layer_grad_norms {
            rec["layer_grad_norm"] = json!(n);
        }
        rec
    }
}

/// Points of a step where [`Trainer::step_traced`] calls its observer (the memory plan reads the
/// device's ledger there; the crash autopsy reads the gradients).
#[derive(Clone, Copy, Debug)]
pub enum StepPoint<'a> {
    /// The tape holds the batch; the forward pass starts.
    Forward,
    /// Part `i` of [`Generator::table`] has run.
    Part(usize),
    /// The loss is computed; backward comes next.
    Loss,
    /// The group's gradients (one slot per parameter id), averaged over its micro-batches and
    /// unscaled, before clipping (`clipped` false) and after it (true); only at an update.
    Gradients { grads: &'a [Option<Tensor>], clipped: bool },
}

/// The gradient norm of each part (its parameter ids), in one reduction.
fn layer_norms(grads: &[Option<Tensor>], parts: &[std::ops::Range<usize>]) -> Result<Vec<f64>> {
    let per_id = crate::optim::sumsq_by_slot(grads)?;
    Ok(parts.iter().map(|ids| ids.clone().filter_map(|i| per_id.get(i)).sum::<f64>().sqrt()).collect())
}

/// The loss spike guard: a loss over `spike_factor` times the mean of the last `spike_window`
/// accepted losses (once three are in, or the whole window when it is shorter) is a spike.
#[derive(Clone, Debug)]
pub struct SpikeGuard {
    factor: f64,
    len: usize,
    action: SpikeAction,
    window: Vec<f64>,
}

impl SpikeGuard {
    pub fn new(cfg: &TrainConfig) -> SpikeGuard {
        SpikeGuard { factor: cfg.spike_factor, len: cfg.spike_window, action: cfg.spike_action, window: Vec::new() }
    }

    pub fn is_spike(&self, loss: f64) -> bool {
        self.reference().is_some_and(|m| loss > self.factor * m)
    }

    /// The mean a loss is compared with: of the window's losses, from the first one on (step 1
    /// is compared with step 0, the initial weights' loss; no update precedes step 0, so it
    /// cannot be a blow-up).
    pub fn reference(&self) -> Option<f64> {
        let w = &self.window;
        (!w.is_empty()).then(|| w.iter().sum::<f64>() / w.len() as f64)
    }

    /// A spike is a loss over this many times [`SpikeGuard::reference`].
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Takes `loss` into the window.
    pub fn accept(&mut self, loss: f64) {
        self.window.push(loss);
        if self.window.len() > self.len {
            self.window.remove(0);
        }
    }

    pub fn action(&self) -> SpikeAction {
        self.action
    }

    /// The recent accepted losses, oldest first.
    pub fn state(&self) -> &[f64] {
        &self.window
    }

    pub fn restore(&mut self, window: Vec<f64>) {
        self.window = window;
    }
}

/// The trainer's state besides tensors: with the parameters and the optimiser's moments, what
/// a checkpoint holds for an exact resume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Micro-batches run.
    pub steps: u64,
    /// Updates made: the schedule's position.
    pub updates: u64,
    /// The optimiser's own update count (Adam's bias correction), which a rollback moves back
    /// while `updates` goes on. Checkpoints written before it existed hold `updates` only.
    #[serde(default)]
    pub optimizer_updates: Option<u64>,
    pub schedule: ScheduleState,
    /// Recent accepted losses (the spike window).
    pub window: Vec<f64>,
    pub consecutive_failures: usize,
    pub outcomes: BTreeMap<StepOutcome, u64>,
    /// fp16's dynamic loss scaler (None in fp32 and bf16).
    #[serde(default)]
    pub scaler: Option<ScalerState>,
    /// How many points back the last rollback went, plus one (see `Trainer::rollback_depth`).
    #[serde(default)]
    pub climbing_depth: usize,
    /// The first step's loss: what epoch 1's end is judged by as a rollback point.
    #[serde(default)]
    pub first_loss: Option<f64>,
}

/// A state a rollback may return to: parameters, the optimiser's state, the spike guard's window
/// there, and the epoch whose end it is (0: the initial weights).
#[derive(Clone)]
pub struct GoodPoint {
    pub params: ParamStore,
    pub optimizer: OptimizerState,
    pub window: Vec<f64>,
    pub epoch: usize,
}

impl GoodPoint {
    /// A point holding (copy-on-write shares of) `params` and `optimizer`.
    fn of(params: &ParamStore, optimizer: &OptimizerState, window: Vec<f64>, epoch: usize) -> GoodPoint {
        GoodPoint { params: params.clone(), optimizer: optimizer.clone(), window, epoch }
    }
}

/// The forward pass and the configured loss of one batch.
pub struct Forward {
    pub output: Var,
    /// The objective, with the auxiliary term when its weight is positive.
    pub loss: Var,
    /// The main loss alone (what validation reports).
    pub main: Var,
    /// The objective over the per-sample mean: the batch size for `reduction = "sum"`, else 1.
    /// The step reports (and the spike guard sees) the objective divided by it.
    pub per_sample: f64,
}

/// What the loss of a batch needs besides the model: the loss config, the probe scaled by
/// `probe_scale` ([`loss::scaled_probe`]; the grid-lines workload's physics losses) and the
/// auxiliary supervised term's weight (0: none).
pub struct Objective<'a> {
    pub loss: &'a LossConfig,
    pub scaled_probe: Option<&'a Tensor>,
    pub aux_weight: f64,
    /// Which auxiliary term `aux_weight` weighs.
    pub aux: AuxLoss,
}

/// Forward pass and loss(es) of `batch` on tape `t`; `trace` sees each part of the generator.
pub fn forward_and_loss(t: &mut Tape, model: &Generator, obj: &Objective, batch: &Batch, trace: &mut dyn FnMut(usize)) -> Result<Forward> {
    forward_and_loss_with(t, model, obj, batch, false, trace)
}

fn forward_and_loss_with(t: &mut Tape, model: &Generator, obj: &Objective, batch: &Batch, nan_output: bool, trace: &mut dyn FnMut(usize)) -> Result<Forward> {
    let x = t.constant(batch.input.clone());
    let mut output = model.forward_traced(t, &x, trace)?;
    if nan_output {
        output = ops::scale(t, &output, f64::NAN)?;
    }
    let mut per_sample = 1.0;
    let (main, loss) = match &batch.target {
        Target::Ptycho { y_i, y_phi } => {
            let probe = obj.scaled_probe.ok_or_else(|| Error::invalid("loss", "the grid-lines losses need the probe"))?;
            let (yi, yp) = (t.constant(y_i.clone()), t.constant(y_phi.clone()));
            let targets = loss::Targets { diffraction: &x, y_i: &yi, y_phi: &yp };
            let main = loss::objective(t, obj.loss, &output, &targets, probe)?;
            let aux = match obj.aux {
                _ if obj.aux_weight <= 0.0 => None,
                AuxLoss::None => None,
                AuxLoss::SupervisedL1 => {
                    let aux_cfg = LossConfig { kind: LossKind::SupervisedL1, ..obj.loss.clone() };
                    Some(loss::objective(t, &aux_cfg, &output, &targets, probe)?)
                }
                // Unpaired batches (validation, the memory plan) have no overlap term.
                AuxLoss::Overlap => batch.pairs.map(|p| loss::overlap_disagreement(t, &output, p, probe)).transpose()?,
            };
            let loss = match aux {
                Some(aux) => {
                    let aux = ops::scale(t, &aux, obj.aux_weight)?;
                    ops::add(t, &main, &aux)?
                }
                None => main.clone(),
            };
            (main, loss)
        }
        Target::Field(u) => {
            let u = t.constant(u.clone());
            let main = loss::field_objective(t, obj.loss.kind, &output, &u)?;
            // The objective of `reduction = "sum"` is the batch's sum; validation keeps the mean.
            let loss = match obj.loss.reduction {
                Reduction::Mean => main.clone(),
                Reduction::Sum => {
                    per_sample = u.dims()[0] as f64;
                    ops::scale(t, &main, per_sample)?
                }
            };
            (main, loss)
        }
    };
    Ok(Forward { output, loss, main, per_sample })
}

/// The model with everything that trains it.
pub struct Trainer {
    model: Generator,
    loss: LossConfig,
    /// The auxiliary supervised term's weight over updates, when `aux_loss` asks for one.
    aux: Option<AuxSchedule>,
    /// Which auxiliary term the schedule weighs.
    aux_kind: AuxLoss,
    /// The scaled probe (grid lines; None for Darcy).
    probe: Option<Tensor>,
    optimizer: Optimizer,
    schedule: Schedule,
    clipper: Clipper,
    scaler: Option<LossScaler>,
    guard: SpikeGuard,
    accumulate: usize,
    rollback_lr_factor: f64,
    faults: FaultConfig,
    /// Gradients summed over the micro-batches of the current group.
    acc: Vec<Option<Tensor>>,
    /// Set while `acc` holds a lone micro-batch's early, unscaled gradients: their sums of
    /// squares, read back with its loss.
    early_sq: Option<Vec<f64>>,
    micro: usize,
    /// The rollback points, oldest first, at most `rollback_points` (`spike_action = "rollback"`
    /// only: each costs a set of parameters and moments once a later update writes apart).
    good: Vec<GoodPoint>,
    rollback_points: usize,
    good_point_factor: f64,
    /// The newest rollback point is the current state (nothing updated since it was made).
    newest_is_current: bool,
    /// How many points back the last rollback went, plus one: a rollback while the rate is still
    /// climbing back from the last goes this many points back.
    climbing_depth: usize,
    /// The first step's loss: what epoch 1's end is judged by as a rollback point.
    first_loss: Option<f64>,
    /// Where each step's forward pass notes its activations (the crash autopsy's), if anywhere.
    activation_probe: Option<ActivationProbe>,
    /// `train.log_layers`: each part's parameter ids, whose gradient norms each update reports.
    layer_ids: Option<Vec<std::ops::Range<usize>>>,
    /// `train.max_consecutive_failures`: a round ends at the step that reaches it (the run does).
    max_failures: usize,
    steps: u64,
    updates: u64,
    consecutive_failures: usize,
    outcomes: BTreeMap<StepOutcome, u64>,
}

impl Trainer {
    /// The trainer of `cfg` for `model` (built with [`Generator::for_run`]), with the
    /// illumination `probe` [N, N, 2] on the model's device and a schedule over
    /// `total_updates` updates.
    pub fn new(cfg: &Config, model: Generator, probe: Option<&Tensor>, total_updates: u64) -> Result<Trainer> {
        let t = &cfg.train;
        let optimizer = Optimizer::new(t, &model.params);
        // The initial weights are the first rollback point.
        let good = if t.spike_action == SpikeAction::Rollback { vec![GoodPoint::of(&model.params, optimizer.state(), Vec::new(), 0)] } else { Vec::new() };
        Ok(Trainer {
            probe: probe.map(|p| loss::scaled_probe(p, &cfg.loss)).transpose()?,
            loss: cfg.loss.clone(),
            aux: (t.aux_loss != AuxLoss::None).then(|| AuxSchedule::new(t)),
            aux_kind: t.aux_loss,
            optimizer,
            schedule: Schedule::new(t, total_updates),
            clipper: Clipper::new(t),
            scaler: (model.precision() == Precision::Fp16).then(|| LossScaler::new(t)),
            guard: SpikeGuard::new(t),
            accumulate: t.accumulate,
            rollback_lr_factor: t.rollback_lr_factor,
            faults: cfg.faults.clone(),
            acc: Vec::new(),
            early_sq: None,
            micro: 0,
            good,
            rollback_points: t.rollback_points,
            good_point_factor: t.good_point_factor,
            newest_is_current: true,
            climbing_depth: 0,
            first_loss: None,
            activation_probe: None,
            layer_ids: t.log_layers.then(|| model.table().iter().map(|r| r.param_ids.clone()).collect()),
            max_failures: t.max_consecutive_failures,
            model,
            steps: 0,
            updates: 0,
            consecutive_failures: 0,
            outcomes: BTreeMap::new(),
        })
    }

    pub fn model(&self) -> &Generator {
        &self.model
    }

    /// The scaled probe the loss illuminates with (grid lines).
    pub fn scaled_probe(&self) -> Option<&Tensor> {
        self.probe.as_ref()
    }

    /// The main loss's objective (no auxiliary term): what validation measures.
    /// A loss over this many times the recent mean is a spike (`train.spike_factor`).
    pub fn spike_factor(&self) -> f64 {
        self.guard.factor()
    }

    pub fn objective(&self) -> Objective<'_> {
        Objective { loss: &self.loss, scaled_probe: self.probe.as_ref(), aux_weight: 0.0, aux: AuxLoss::None }
    }

    pub fn optimizer_state(&self) -> &OptimizerState {
        self.optimizer.state()
    }

    /// Micro-batches per update.
    pub fn accumulate(&self) -> usize {
        self.accumulate
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The rate the next update uses.
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.updates)
    }

    pub fn consecutive_failures(&self) -> usize {
        self.consecutive_failures
    }

    pub fn outcomes(&self) -> &BTreeMap<StepOutcome, u64> {
        &self.outcomes
    }

    /// An epoch's end, with its validation loss `val` (epoch `epoch`, counted from 1) and the
    /// best validation loss of the epochs before: the schedule's per-epoch hook
    /// (ReduceLROnPlateau), and, with rollbacks, whether this state becomes a rollback point: only
    /// a finite one whose validation loss is at most `good_point_factor` x the best before (the
    /// first epoch: x the first step's loss). Returns that verdict and the bound it was judged by.
    pub fn end_epoch(&mut self, val: f64, epoch: usize, best_before: Option<f64>) -> (bool, Option<f64>) {
        self.schedule.on_epoch(val);
        let bound = best_before.or(self.first_loss).map(|r| self.good_point_factor * r);
        let good = val.is_finite() && bound.is_none_or(|b| val <= b);
        if good {
            self.mark_good(epoch);
        }
        (good, bound)
    }

    /// Whether a group of micro-batches is under way (gradients accumulated, no update yet).
    pub fn mid_group(&self) -> bool {
        self.micro > 0
    }

    /// The rollback points, oldest first (`spike_action = "rollback"` only), and whether the
    /// newest is the current state.
    pub fn good(&self) -> (&[GoodPoint], bool) {
        (&self.good, self.newest_is_current)
    }

    /// How many points back from the newest the next rollback goes: one further than the last
    /// rollback when it comes while the rate is still climbing back from that one (the point led
    /// straight to another spike), else the newest.
    fn rollback_depth(&self) -> usize {
        let back = if self.schedule.climbing(self.updates) { self.climbing_depth } else { 0 };
        back.min(self.good.len().saturating_sub(1))
    }

    /// The point the next rollback returns to.
    pub fn rollback_target(&self) -> Option<&GoodPoint> {
        self.good.len().checked_sub(1 + self.rollback_depth()).map(|i| &self.good[i])
    }

    /// Sends each later step's activation notes ([`Tape::note`]) to `probe`.
    pub fn set_activation_probe(&mut self, probe: Option<ActivationProbe>) {
        self.activation_probe = probe;
    }

    /// Sets the schedule's horizon (a run extended with more epochs).
    pub fn set_horizon(&mut self, total_updates: u64) {
        self.schedule.set_horizon(total_updates);
    }

    /// Replaces the model's parameters (an early-stopped run's best epoch), keeping the rest.
    pub fn set_params(&mut self, params: ParamStore) {
        self.model.params = params;
        self.newest_is_current = false;
    }

    /// Makes the current state (parameters, optimiser, the spike guard's window) the newest
    /// rollback point (`spike_action = "rollback"` only), dropping the oldest beyond
    /// `rollback_points`; `epoch` names it.
    pub fn mark_good(&mut self, epoch: usize) {
        if self.good.is_empty() {
            return;
        }
        if self.newest_is_current {
            self.good.pop();
        }
        self.push_current_point(epoch);
        let extra = self.good.len().saturating_sub(self.rollback_points);
        self.good.drain(..extra);
        self.climbing_depth = 0;
    }

    /// Appends the current state (parameters, optimiser, the spike guard's window) as the
    /// newest rollback point, named `epoch`.
    fn push_current_point(&mut self, epoch: usize) {
        self.good.push(GoodPoint::of(&self.model.params, self.optimizer.state(), self.guard.state().to_vec(), epoch));
        self.newest_is_current = true;
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            steps: self.steps,
            updates: self.updates,
            optimizer_updates: Some(self.optimizer.updates()),
            schedule: self.schedule.state().clone(),
            window: self.guard.state().to_vec(),
            consecutive_failures: self.consecutive_failures,
            outcomes: self.outcomes.clone(),
            scaler: self.scaler.as_ref().map(|s| s.state().clone()),
            climbing_depth: self.climbing_depth,
            first_loss: self.first_loss,
        }
    }

    /// Continues from a checkpoint: its state, parameters and optimiser tensors (whose update
    /// count this sets from `state`), and the rollback points it saved (`newest_is_current`: the
    /// newest is the checkpoint's own state, not stored twice); a checkpoint that saved none
    /// (one written before rollback points were stored at every epoch end) has its own state
    /// as the point.
    pub fn restore(&mut self, state: TrainerState, params: ParamStore, mut optimizer: OptimizerState, good: Vec<GoodPoint>, newest_is_current: bool) {
        optimizer.updates = state.optimizer_updates.unwrap_or(state.updates);
        self.model.params = params;
        self.optimizer.restore(optimizer);
        self.schedule.restore(state.schedule);
        self.guard.restore(state.window);
        if let (Some(s), Some(st)) = (self.scaler.as_mut(), state.scaler) {
            s.restore(st);
        }
        self.steps = state.steps;
        self.updates = state.updates;
        self.consecutive_failures = state.consecutive_failures;
        self.outcomes = state.outcomes;
        self.climbing_depth = state.climbing_depth;
        self.first_loss = state.first_loss;
        self.acc.clear();
        self.early_sq = None;
        self.micro = 0;
        if self.good.is_empty() {
            return;
        }
        self.good = good;
        self.newest_is_current = false;
        if newest_is_current || self.good.is_empty() {
            let epoch = self.good.last().map_or(0, |p| p.epoch);
            self.push_current_point(epoch);
        }
    }

    /// One micro-batch; `end_group` makes it the last of its group of `accumulate` (the end of
    /// an epoch updates with the micro-batches it has).
    pub fn step(&mut self, batch: Batch, end_group: bool) -> Result<StepReport> {
        self.step_traced(batch, end_group, &mut |_| {})
    }

    /// [`Trainer::step`], calling `trace` at the points of [`StepPoint`].
    pub fn step_traced(&mut self, batch: Batch, end_group: bool, trace: &mut dyn FnMut(StepPoint)) -> Result<StepReport> {
        let round = self.round(Some(batch), 1, end_group.then_some(0), &World::solo(), false, trace)?;
        round.reports.into_iter().next().ok_or_else(|| Error::invalid("step", "a round of one micro-batch reported none"))
    }

    /// One round of a data-parallel run: the next `n` micro-batches of the epoch (1 <= n <= the
    /// world's size), rank r holding the r-th (`mine`; ranks at n and beyond hold none), and
    /// `epoch_last` the position of the epoch's last micro-batch if it is in the round. Every rank
    /// runs its forward pass; the losses are gathered and every rank replays, in micro-batch
    /// order, the decisions one process makes step by step (input and loss checks, the spike
    /// guard, skips, rollbacks, the group's end); the accepted micro-batches' gradients are
    /// gathered and summed in that order; an update ends the round. Positions after an update or
    /// a rollback ran on parameters that have changed: the round ends before them (they are not
    /// reported, and the next round runs them again). `stop` is this rank's stop request; the
    /// round returns whether any rank made one.
    pub fn round(
        &mut self,
        mine: Option<Batch>,
        n: usize,
        epoch_last: Option<usize>,
        world: &World,
        stop: bool,
        trace: &mut dyn FnMut(StepPoint),
    ) -> Result<Round> {
        let (rank, size) = (world.rank(), world.size());
        if n == 0 || n > size || mine.is_some() != (rank < n) {
            return Err(Error::invalid("round", format!("rank {rank} of {size}: a round of {n} micro-batches, this rank's given: {}", mine.is_some())));
        }
        let first = self.steps;
        let scale = self.scaler.as_ref().map(|s| s.scale());
        let aux_weight = self.aux.map_or(0.0, |a| a.at(self.updates));

        // This rank's micro-batch, up to its loss; every rank's loss (or why there is none). A
        // lone micro-batch that would update if accepted also back-propagates before its loss is
        // read, so that the loss, the input check and the gradients' norms come back in one copy
        // (one synchronisation of a GPU per step); the gradients are dropped if it is not.
        let early = size == 1 && self.micro == 0 && (self.accumulate == 1 || epoch_last == Some(0));
        let local = match mine {
            None => Ok(Local::Absent),
            Some(b) => self.forward_local(b, first + rank as u64, aux_weight, early.then_some(scale), trace),
        };
        let mut packet = vec![0u8; 10];
        match &local {
            Ok(Local::Absent) => {}
            Ok(Local::BadInput) => packet[0] = 1,
            Ok(Local::Loss(f)) => {
                packet[0] = 2;
                packet[2..10].copy_from_slice(&f.value.to_le_bytes());
            }
            Err(e @ Error::OutOfMemory { .. }) => {
                packet[0] = 3;
                packet.extend(oom_bytes(e));
            }
            Err(_) => return local.map(|_| unreachable!("an Ok was matched above")),
        }
        packet[1] = stop as u8;
        let packets = world.all_gather(&packet)?;
        let stop = packets.iter().any(|p| p.get(1) == Some(&1));
        check_oom(&packets, 10)?;
        let mut local = local?;

        // The single process's decisions, position by position.
        let mut reports = Vec::with_capacity(n);
        let mut backprop = Vec::new();
        let mut update_at = None;
        for (k, p) in packets.iter().take(n).enumerate() {
            let step = first + k as u64;
            self.steps += 1;
            let mut report = StepReport {
                step,
                outcome: StepOutcome::Ok,
                lr: self.lr(),
                loss: None,
                clip: None,
                loss_scale: scale,
                loss_scale_after: scale,
                spike_reference: None,
                rolled_back_to: None,
                layer_grad_norms: None,
            };
            let (outcome, ends) = match p.first() {
                Some(1) => (StepOutcome::SkippedBadInput, false),
                Some(2) if p.len() >= 10 => {
                    let lv = f64::from_le_bytes(p[2..10].try_into().expect("8 bytes"));
                    report.loss = Some(lv);
                    self.decide(k, lv, epoch_last == Some(k), &mut report, &mut backprop, &mut update_at)
                }
                _ => return Err(Error::invalid("round", format!("rank {k} had no micro-batch at position {k} of a round of {n}"))),
            };
            let pending = update_at == Some(k);
            if !pending {
                self.finish_step(&mut report, outcome);
            }
            reports.push(report);
            if ends || pending || self.consecutive_failures >= self.max_failures {
                break;
            }
        }

        // The accepted micro-batches' gradients, summed in micro-batch order.
        if !backprop.is_empty() {
            let own = match std::mem::replace(&mut local, Local::Absent) {
                Local::Loss(f) if backprop.contains(&rank) => {
                    // Early gradients are unscaled already: the update clips them with their sums.
                    self.early_sq = f.sq;
                    Some(f.pending.backward(scale))
                }
                _ => None,
            };
            if size == 1 {
                let grads = own.ok_or_else(|| Error::invalid("round", "the accepted micro-batch has no forward pass"))??;
                self.accumulate_grads(grads)?;
            } else {
                let shapes: Vec<_> = self.model.params.values().iter().map(|v| v.shape().clone()).collect();
                let device = self.model.params.values().first().map(|v| v.device().clone()).unwrap_or_else(crate::device::Device::cpu);
                let mut all = world.gather_grads(own, &shapes, &device)?;
                for &k in &backprop {
                    let grads = all[k].take().ok_or_else(|| Error::invalid("round", format!("rank {k}'s accepted micro-batch sent no gradients")))?;
                    self.accumulate_grads(grads)?;
                }
            }
        }
        drop(local);
        if let Some(k) = update_at {
            let spike = reports[k].spike_reference.is_some();
            let outcome = self.update(&mut reports[k], spike, trace)?;
            self.finish_step(&mut reports[k], outcome);
        }
        Ok(Round { reports, stop })
    }

    /// A micro-batch's forward pass and loss on this rank (step `step`), kept for its backward;
    /// with `early` (the fp16 loss scale, if any), its backward too, the gradients unscaled as an
    /// update of this one micro-batch would, and their sums of squares. What the host needs (the
    /// input's sum of squares, whose finiteness says whether the input was, the loss, the sums)
    /// is read back in one copy; a non-finite input is found there, after a forward pass over it
    /// that is thrown away.
    fn forward_local(&self, mut batch: Batch, step: u64, aux_weight: f64, early: Option<Option<f64>>, trace: &mut dyn FnMut(StepPoint)) -> Result<Local> {
        if self.faults.nan_input_steps.contains(&step) {
            batch.input = Tensor::full(f64::NAN, batch.input.shape().clone(), batch.input.dtype(), batch.input.device())?;
        }
        let input_sq = backend::reduce(backend::Reduce::SumSq, &batch.input)?;
        let mut t = Tape::with_params(&self.model.params);
        if let Some(p) = &self.activation_probe {
            t.set_probe(p.clone());
        }
        let obj = Objective { loss: &self.loss, scaled_probe: self.probe.as_ref(), aux_weight, aux: self.aux_kind };
        trace(StepPoint::Forward);
        let nan_output = self.faults.nan_forward_steps.contains(&step);
        // Only the loss is kept: the tape frees each activation once backward is past it, and
        // a handle held here (the output's, 2 x B x N x N floats) would outlive that.
        let Forward { mut loss, per_sample, .. } = forward_and_loss_with(&mut t, &self.model, &obj, &batch, nan_output, &mut |i| trace(StepPoint::Part(i)))?;
        if self.faults.spike_steps.contains(&step) {
            loss = ops::scale(&mut t, &loss, self.faults.spike_scale)?;
        }
        trace(StepPoint::Loss);
        let loss_value = loss.value().clone();
        let (pending, sq_on_device) = match early {
            None => (Pending::Tape(Box::new(t), loss), None),
            Some(scale) => {
                let mut grads = Pending::Tape(Box::new(t), loss).backward(scale)?;
                let unscale = 1.0 / scale.unwrap_or(1.0);
                if unscale != 1.0 {
                    optim::scale_all(&mut grads, unscale)?;
                }
                // No gradient at all: no sums to read, and none to clip with.
                let sq = optim::sumsq_each_on_device(&grads.iter().flatten().collect::<Vec<_>>())?;
                (Pending::Unscaled(grads), Some(sq))
            }
        };
        let mut read: Vec<&Tensor> = vec![&input_sq, &loss_value];
        read.extend(sq_on_device.iter().flatten());
        let values = Tensor::to_f64_vecs(&read)?;
        let [input_sq, loss_value, sums @ ..] = values.as_slice() else {
            return Err(Error::invalid("step", format!("{} values read back for {} tensors", values.len(), read.len())));
        };
        if !input_sq.first().is_some_and(|v| v.is_finite()) {
            return Ok(Local::BadInput);
        }
        let value = loss_value.first().copied().unwrap_or(f64::NAN) / per_sample;
        let sq = sq_on_device.map(|_| sums.first().cloned().unwrap_or_default());
        Ok(Local::Loss(Box::new(LocalLoss { pending, value, sq })))
    }

    /// What the step at position `k` of a round does with its loss `lv`, as one process decides
    /// it: its outcome (for an update, the outcome if the update goes through), and whether the
    /// round ends there (a rollback). An accepted micro-batch joins `backprop`; the one that
    /// completes its group (`last`: the epoch's last) sets `update_at`.
    fn decide(
        &mut self,
        k: usize,
        lv: f64,
        last: bool,
        report: &mut StepReport,
        backprop: &mut Vec<usize>,
        update_at: &mut Option<usize>,
    ) -> (StepOutcome, bool) {
        if !lv.is_finite() {
            return (StepOutcome::SkippedNonfiniteLoss, false);
        }
        self.first_loss.get_or_insert(lv);
        let spike = self.guard.is_spike(lv);
        if spike {
            report.spike_reference = self.guard.reference();
            match self.guard.action() {
                SpikeAction::Log => {}
                SpikeAction::Skip => return (StepOutcome::SpikeSkipped, false),
                SpikeAction::Rollback => {
                    report.rolled_back_to = self.rollback_target().map(|p| p.epoch);
                    self.roll_back();
                    // The group's gradients are dropped, those of this round's earlier
                    // micro-batches with them (one process had summed them before the spike).
                    backprop.clear();
                    return (StepOutcome::RolledBack, true);
                }
            }
        }
        backprop.push(k);
        self.micro += 1;
        self.guard.accept(lv);
        if self.micro >= self.accumulate || last {
            *update_at = Some(k);
        }
        let went_on = if spike {
            StepOutcome::SpikeLogged
        } else if update_at.is_some() {
            StepOutcome::Ok
        } else {
            StepOutcome::Accumulated
        };
        (went_on, false)
    }

    /// Counts a step's final outcome.
    fn finish_step(&mut self, report: &mut StepReport, outcome: StepOutcome) {
        report.outcome = outcome;
        report.loss_scale_after = self.scaler.as_ref().map(|s| s.scale());
        *self.outcomes.entry(outcome).or_default() += 1;
        self.consecutive_failures = if outcome.is_failure() { self.consecutive_failures + 1 } else { 0 };
    }

    /// Adds a micro-batch's gradients to the group's (the first one's become the sum).
    fn accumulate_grads(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        if self.acc.is_empty() {
            self.acc = grads;
            return Ok(());
        }
        for (a, g) in self.acc.iter_mut().zip(grads) {
            *a = match (a.take(), g) {
                (Some(x), Some(y)) => Some(backend::add_into(x, y)?),
                (x, y) => x.or(y),
            };
        }
        Ok(())
    }

    /// The group's update at `report`'s step: the summed gradients averaged and unscaled,
    /// clipped, and applied unless they are not finite. Returns the step's outcome.
    fn update(&mut self, report: &mut StepReport, spike: bool, trace: &mut dyn FnMut(StepPoint)) -> Result<StepOutcome> {
        let step = report.step;
        let mut grads = std::mem::take(&mut self.acc);
        // Average the micro-batches and undo the loss scale (a power of two: exact), unless the
        // early backward of a lone micro-batch did (its sums of squares came back with its loss).
        let early_sq = self.early_sq.take();
        let unscale = 1.0 / (self.micro as f64 * report.loss_scale.unwrap_or(1.0));
        self.micro = 0;
        if unscale != 1.0 && early_sq.is_none() {
            optim::scale_all(&mut grads, unscale)?;
        }
        trace(StepPoint::Gradients { grads: &grads, clipped: false });
        if let Some(parts) = &self.layer_ids {
            report.layer_grad_norms = Some(layer_norms(&grads, parts)?);
        }
        let clip = match early_sq {
            Some(sq) => self.clipper.clip_with(&mut grads, &self.model.params, sq)?,
            None => self.clipper.clip(&mut grads, &self.model.params)?,
        };
        trace(StepPoint::Gradients { grads: &grads, clipped: true });
        report.clip = Some(clip);
        if !clip.norm_before.is_finite() {
            return Ok(match self.scaler.as_mut().map(|s| s.update(false)) {
                Some(ScaleEvent::Overflow { at_floor: true, .. }) => StepOutcome::OverflowAtFloor,
                Some(_) => StepOutcome::OverflowSkipped,
                None => StepOutcome::SkippedNonfiniteGrad,
            });
        }
        // The `bad_update_steps` fault: an update at spike_scale x the rate, whose damage the loss
        // shows only at later steps (or in the epoch's validation, at an epoch's end).
        let lr = if self.faults.bad_update_steps.contains(&step) { report.lr * self.faults.spike_scale } else { report.lr };
        self.optimizer.step(&mut self.model.params, &grads, lr)?;
        self.updates += 1;
        self.newest_is_current = false;
        if let Some(s) = self.scaler.as_mut() {
            s.update(true);
        }
        Ok(if spike { StepOutcome::SpikeLogged } else { StepOutcome::Ok })
    }

    /// Back to a rollback point, at a lower rate that climbs back over `rollback_rewarmup`
    /// updates; the group's gradients are dropped. A rollback goes to the newest point, or, while
    /// the rate is still climbing back from the last rollback, one point older than that one went
    /// (a point that leads straight to another spike is passed over); the spike guard's window
    /// becomes the point's own.
    fn roll_back(&mut self) {
        if !self.good.is_empty() {
            let back = self.rollback_depth();
            let p = &self.good[self.good.len() - 1 - back];
            self.model.params = p.params.clone();
            self.optimizer.restore(p.optimizer.clone());
            // The initial weights' point has no window yet: its loss is the first step's.
            self.guard.restore(if p.window.is_empty() { self.first_loss.into_iter().collect() } else { p.window.clone() });
            self.newest_is_current = back == 0;
            self.climbing_depth = back + 1;
        }
        self.schedule.cut_rate(self.rollback_lr_factor, self.updates);
        self.acc.clear();
        self.early_sq = None;
        self.micro = 0;
    }
}

/// What a round did: one report per micro-batch it consumed (from the round's first), and
/// whether any rank asked to stop.
pub struct Round {
    pub reports: Vec<StepReport>,
    pub stop: bool,
}

/// This rank's micro-batch of a round, up to its loss.
enum Local {
    /// The round had no micro-batch for this rank.
    Absent,
    /// The input was not finite: nothing was computed.
    BadInput,
    Loss(Box<LocalLoss>),
}

/// A forward pass kept for its backward (or its backward, done early).
struct LocalLoss {
    pending: Pending,
    /// The loss per sample (what the step reports and the guard sees).
    value: f64,
    /// With the early backward: the sums of squares of the unscaled gradients (one per present
    /// gradient), what clipping measures.
    sq: Option<Vec<f64>>,
}

/// A micro-batch's backward: still to run on its tape, or run early (the gradients unscaled).
enum Pending {
    Tape(Box<Tape>, Var),
    Unscaled(Vec<Option<Tensor>>),
}

impl Pending {
    /// The parameters' gradients (of the loss times the fp16 loss `scale`, if any).
    fn backward(self, scale: Option<f64>) -> Result<Vec<Option<Tensor>>> {
        match self {
            Pending::Tape(mut tape, mut loss) => {
                // fp16: back-propagate the scaled loss so that small gradients survive rounding.
                if let Some(s) = scale {
                    loss = ops::scale(&mut tape, &loss, s)?;
                }
                Ok(tape.backward(&loss)?.into_params())
            }
            Pending::Unscaled(grads) => Ok(grads),
        }
    }
}
