//! Memory plans: the trainer's own step ([`Trainer::step`]) run on the meta device (shapes and
//! byte counts, no data), whose ledger gives, per generator part, the activations the tape keeps,
//! and the step's peak, with and without activation checkpointing.
//!
//! The step is measured in the trainer's steady state: after warm-up updates, so that the
//! optimiser's state exists and, with `spike_action = rollback`, the rollback snapshot has been
//! written apart from the parameters. Resident are the parameters, the optimiser's state, the
//! snapshot, one batch (diffraction, Y_I, Y_phi) and the scaled probe; then one group of
//! `accumulate` micro-batches runs (forward, loss, guards, backward, accumulation, unscaling,
//! clipping, update) and the peak is read. Every tensor goes through the same dispatch on the
//! meta and the CPU device, and a meta tensor reads as zeros, so the trainer's guards run
//! unchanged and the plan's figures are the CPU's measured ones to the byte ([`step_memory`]
//! runs on either); kernel scratch (im2col, FFT buffers) is not counted on either. Low precision
//! is emulated in fp32 storage (values rounded through bf16/fp16), so bf16/fp16 plans give fp32
//! byte counts: an upper bound for a GPU storing 2-byte activations.

use crate::backend;
use crate::config::Workload;
use crate::config::{CheckpointPolicy, Config};
use crate::data::{Batch, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::Generator;
use crate::tensor::Precision;
use crate::tensor::{DType, Tensor};
use crate::train::{StepOutcome, StepPoint, StepReport, Trainer};

/// One generator part's bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PartMemory {
    pub part: String,
    pub resolution: crate::model::Grid,
    pub width: usize,
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// Activation bytes the tape keeps for this part after the forward pass.
    pub activations: u64,
}

/// What one step on a device measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMemory {
    pub parts: Vec<PartMemory>,
    /// Bytes held before the step: parameters, optimiser state, rollback snapshot, batch, probe.
    pub resident: u64,
    pub params: u64,
    pub optimizer: u64,
    pub snapshot: u64,
    pub batch: u64,
    /// Activations held at the end of the forward pass (the loss included).
    pub activations: u64,
    /// The ledger's peak over the whole step.
    pub peak: u64,
}

/// The plan `fnokern plan` prints: the step without checkpointing and with `policy`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub plain: StepMemory,
    pub policy: CheckpointPolicy,
    pub checkpointed: StepMemory,
    pub batch_size: usize,
    pub precision: Precision,
    pub parameters: usize,
}

/// A trainer of a config in its steady state, with the batch it trains on: what
/// [`step_memory`] measures and the step-time benchmark times (`trainer.step(batch.clone(),
/// true)`).
pub struct SteadyState {
    pub trainer: Trainer,
    /// One batch of `train.batch_size` patterns (|N(0, 1)| diffraction, zero targets).
    pub batch: Batch,
    /// Bytes held by each resident group: parameters, optimiser state, rollback snapshot, and
    /// batch with scaled probe.
    pub params: u64,
    pub optimizer: u64,
    pub snapshot: u64,
    pub batch_bytes: u64,
}

/// Warm-up groups after which a step that never updates is an error (fp16 halves its scale on
/// every overflow, so a few dozen groups reach any scale the gradients fit).
const WARMUP_GROUPS: usize = 64;

impl SteadyState {
    /// Builds the generator and trainer of `cfg` on `dev` and runs update groups until the
    /// optimiser has updated twice with the rollback point marked between: its state exists, and
    /// the snapshot's copy has been written apart.
    pub fn new(cfg: &Config, dev: &Device) -> Result<SteadyState> {
        cfg.validate()?;
        // The faults a config injects are its run's, not the planned step's.
        let mut cfg = Config { faults: Default::default(), ..cfg.clone() };
        // A group's memory is the same for every `accumulate` from 2 up: its first micro-batch
        // creates the accumulated gradients, each later one adds its own into them, and the last
        // also updates. Two micro-batches give that peak; 10^6 of them would take minutes.
        cfg.train.accumulate = cfg.train.accumulate.min(2);
        let cfg = &cfg;
        let at = || dev.memory().current;
        let base = at();
        let mut g = Generator::for_run(cfg, dev)?;
        if cfg.data.workload == Workload::Darcy {
            // A run's FNO-2D decodes its output (two constant fields a step): planned alike.
            let n = cfg.input_size();
            g.set_output_normalizer(crate::data::darcy::Normalizer::identity(n * n))?;
        }
        let params = at() - base;
        let (b, n) = (cfg.train.batch_size, cfg.input_size());
        let before = at();
        let (batch, trainer) = match cfg.data.workload {
            Workload::Gridlines => {
                let obs = Tensor::randn([b, 1, n, n], 1.0, 1, DType::F32, dev)?;
                let batch = Batch {
                    input: backend::unary(backend::Unary::Abs, &obs)?,
                    target: Target::Ptycho { y_i: Tensor::zeros([b, 1, n, n], DType::F32, dev)?, y_phi: Tensor::zeros([b, 1, n, n], DType::F32, dev)? },
                    // Unpaired: the overlap term (train.aux_loss = "overlap") is not planned.
                    pairs: None,
                };
                drop(obs);
                let probe = Tensor::full(1.0, [n, n, 2], DType::F32, dev)?;
                (batch, Trainer::new(cfg, g, Some(&probe), 1000)?)
            }
            Workload::Darcy => {
                let batch = Batch {
                    input: Tensor::randn([b, cfg.in_channels(), n, n], 1.0, 1, DType::F32, dev)?,
                    target: Target::Field(Tensor::full(1.0, [b, 1, n, n], DType::F32, dev)?),
                    pairs: None,
                };
                (batch, Trainer::new(cfg, g, None, 1000)?)
            }
        };
        let batch_bytes = at() - before;
        let mut s = SteadyState { trainer, batch, params, optimizer: 0, snapshot: 0, batch_bytes };
        // The first update creates the optimiser's state; with rollbacks, a rollback point is
        // marked after each of the first `rollback_points` updates, as at epoch ends, and the
        // next update writes parameters and moments apart from the newest: every point is held.
        let points = if cfg.train.spike_action == crate::config::SpikeAction::Rollback { cfg.train.rollback_points as u64 } else { 1 };
        for target in 1..=points + 1 {
            let mut groups = 0;
            while s.trainer.updates() < target {
                if groups == WARMUP_GROUPS {
                    let seen = s.trainer.outcomes().iter().map(|(o, k)| format!("{o} {k}")).collect::<Vec<_>>().join(", ");
                    return Err(Error::invalid("plan", format!("the step made no update in {WARMUP_GROUPS} groups of micro-batches (outcomes: {seen})")));
                }
                s.group(&mut |_| {})?;
                groups += 1;
            }
            if target <= points {
                s.trainer.mark_good(target as usize);
            }
        }
        let st = s.trainer.optimizer_state();
        s.optimizer = st.m.iter().chain(&st.v).flatten().map(|t| t.size_in_bytes() as u64).sum();
        s.snapshot = (at() - base).saturating_sub(s.params + s.optimizer + s.batch_bytes);
        Ok(s)
    }

    /// Bytes held before a step.
    pub fn resident(&self) -> u64 {
        self.params + self.optimizer + self.snapshot + self.batch_bytes
    }

    /// One group of `accumulate` micro-batches, the last ending the group (its update); `trace`
    /// sees the points of the updating micro-batch.
    pub fn group(&mut self, trace: &mut dyn FnMut(StepPoint)) -> Result<StepReport> {
        let k = self.trainer.accumulate();
        for _ in 1..k {
            let r = self.trainer.step(self.batch.clone(), false)?;
            if r.outcome != StepOutcome::Accumulated {
                return Ok(r);
            }
        }
        self.trainer.step_traced(self.batch.clone(), true, trace)
    }
}

/// Runs one steady-state update group of `cfg` (batch `cfg.train.batch_size`, checkpointing
/// `cfg.model.checkpoint`) on `dev` and reads its ledger.
pub fn step_memory(cfg: &Config, dev: &Device) -> Result<StepMemory> {
    let base = dev.memory().current;
    let mut s = SteadyState::new(cfg, dev)?;
    dev.reset_peak();
    let at = || dev.memory().current;
    let (mut marks, mut start, mut activations) = (Vec::new(), 0, 0);
    s.group(&mut |p| match p {
        StepPoint::Forward => {
            start = at();
            marks = vec![start];
        }
        StepPoint::Part(_) => marks.push(at()),
        StepPoint::Loss => activations = at() - start,
        StepPoint::Gradients { .. } => {}
    })?;
    let peak = dev.memory().peak - base;
    let bytes = |p: usize| (p * 4) as u64;
    let slots = s.optimizer / s.params.max(1);
    let parts = s
        .trainer
        .model()
        .table()
        .iter()
        .enumerate()
        .map(|(i, row)| PartMemory {
            part: row.part.clone(),
            resolution: row.resolution,
            width: row.width,
            params: bytes(row.params),
            grads: bytes(row.params),
            optimizer: bytes(row.params) * slots,
            activations: marks.get(i + 1).zip(marks.get(i)).map_or(0, |(a, b)| a.saturating_sub(*b)),
        })
        .collect();
    Ok(StepMemory { parts, resident: s.resident(), params: s.params, optimizer: s.optimizer, snapshot: s.snapshot, batch: s.batch_bytes, activations, peak })
}

/// The plan of `cfg` on the meta device: without checkpointing, and with `policy` (the config's
/// own policy if it has one, else `every_level`).
pub fn plan(cfg: &Config) -> Result<Plan> {
    let policy = match cfg.model.checkpoint {
        CheckpointPolicy::None => CheckpointPolicy::EveryLevel,
        p => p,
    };
    let mut plain = cfg.clone();
    plain.model.checkpoint = CheckpointPolicy::None;
    let mut ck = cfg.clone();
    ck.model.checkpoint = policy;
    let parameters = Generator::for_run(cfg, &Device::meta())?.num_params();
    Ok(Plan {
        plain: step_memory(&plain, &Device::meta())?,
        policy,
        checkpointed: step_memory(&ck, &Device::meta())?,
        batch_size: cfg.train.batch_size,
        precision: cfg.train.precision,
        parameters,
    })
}

/// Bytes as GiB with two decimals.
pub fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Plan {
    /// The table `fnokern plan` prints; `limit` adds a fits / does not fit line for each step.
    pub fn render(&self, limit: Option<u64>) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
        let _ = writeln!(
            s,
            "{:<26} {:>9} {:>6} {:>11} {:>11} {:>11} {:>13} {:>13}",
            "part (MiB)",
            "resolution",
            "width",
            "parameters",
            "gradients",
            "optimizer",
            "activations",
            format!("act. {}", self.policy)
        );
        for (a, b) in self.plain.parts.iter().zip(&self.checkpointed.parts) {
            let _ = writeln!(
                s,
                "{:<26} {:>9} {:>6} {:>11} {:>11} {:>11} {:>13} {:>13}",
                a.part,
                a.resolution.to_string(),
                a.width,
                mib(a.params),
                mib(a.grads),
                mib(a.optimizer),
                mib(a.activations),
                mib(b.activations)
            );
        }
        let p = &self.plain;
        let c = &self.checkpointed;
        let _ = writeln!(
            s,
            "{:<26} {:>9} {:>6} {:>11} {:>11} {:>11} {:>13} {:>13}",
            "total (loss included)",
            "",
            "",
            mib(p.params),
            mib(p.params),
            mib(p.optimizer),
            mib(p.activations),
            mib(c.activations)
        );
        let _ = writeln!(
            s,
            "\n{} parameters; batch {}; precision {}; resident before the step: {} (parameters {}, optimizer {}, rollback snapshot {}, batch and probe {})",
            self.parameters,
            self.batch_size,
            self.precision,
            gib(p.resident),
            gib(p.params),
            gib(p.optimizer),
            gib(p.snapshot),
            gib(p.batch)
        );
        let verdict = |peak: u64| match limit {
            Some(l) if peak <= l => format!("  fits in {}", gib(l)),
            Some(l) => format!("  EXCEEDS {} by {}", gib(l), gib(peak - l)),
            None => String::new(),
        };
        let _ = writeln!(s, "peak of one training step without checkpointing: {} ({} B){}", gib(p.peak), p.peak, verdict(p.peak));
        let _ = writeln!(s, "peak of one training step with checkpoint = {}: {} ({} B){}", self.policy, gib(c.peak), c.peak, verdict(c.peak));
        if self.precision != Precision::Fp32 {
            let _ = writeln!(
                s,
                "note: {} is emulated in fp32 storage (values rounded through it), so these are fp32 byte counts: \
                 an upper bound for a GPU that stores 2-byte activations",
                self.precision
            );
        }
        s
    }
}
