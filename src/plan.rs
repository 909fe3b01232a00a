//! Memory plans: one training step run on the meta device (shapes and byte counts, no data),
//! whose ledger gives, per generator part, the activations the tape keeps, and the step's peak,
//! with and without activation checkpointing.
//!
//! The step is the trainer's steady state: parameters, the optimiser's state, the rollback
//! snapshot (when `spike_action = rollback`: a second copy of parameters and optimiser state),
//! one batch (diffraction, Y_I, Y_phi) and the scaled probe, then forward, the loss, backward,
//! the fp16 loss scale when on, and the optimiser update. Every tensor goes through the same
//! dispatch on the meta and the CPU device, so the plan's figures are the CPU's measured ones to
//! the byte ([`step_memory`] runs on either); kernel scratch (im2col, FFT buffers) is not counted
//! on either. Low precision is emulated in fp32 storage (values rounded through bf16/fp16), so
//! bf16/fp16 plans give fp32 byte counts: an upper bound for a GPU storing 2-byte activations.

use crate::autograd::Tape;
use crate::backend;
use crate::config::{CheckpointPolicy, Config, OptimizerKind, SpikeAction};
use crate::device::Device;
use crate::error::Result;
use crate::loss;
use crate::model::Generator;
use crate::ops;
use crate::optim::Optimizer;
use crate::tensor::Precision;
use crate::tensor::{DType, Tensor};

/// One generator part's bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PartMemory {
    pub part: String,
    pub resolution: usize,
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

fn copy(t: &Tensor) -> Result<Tensor> {
    backend::affine(t, 1.0, 0.0)
}

/// One steady-state training step of a config on a device, set up once and run any number of
/// times: what [`step_memory`] measures and what the step-time benchmark times.
pub struct SyntheticStep {
    cfg: Config,
    g: Generator,
    opt: Optimizer,
    /// The rollback snapshot (parameters, moments), held only to be counted.
    _snapshot: Option<Vec<Tensor>>,
    diffraction: Tensor,
    y_i: Tensor,
    y_phi: Tensor,
    probe: Tensor,
    /// Bytes of each resident group: parameters, optimiser state, snapshot, batch and probe.
    pub params: u64,
    pub optimizer: u64,
    pub snapshot: u64,
    pub batch: u64,
    slots: u64,
}

/// The ledger readings of one run of a [`SyntheticStep`].
struct StepReadings {
    /// Ledger after each part of the generator's forward pass (and before the first).
    marks: Vec<u64>,
    activations: u64,
}

impl SyntheticStep {
    /// Builds the generator, the optimiser state (as after its first update: Adam's two moments,
    /// SGD's momentum buffer), the rollback snapshot when `spike_action = rollback` (its own copy:
    /// the trainer's update is copy-on-write, so after one update the copies are distinct), and a
    /// batch of `cfg.train.batch_size` patterns on `dev`.
    pub fn new(cfg: &Config, dev: &Device) -> Result<SyntheticStep> {
        cfg.validate()?;
        let at = || dev.memory().current;
        let base = at();
        let mut g = Generator::new(&cfg.model, cfg.data.n, 1, dev, DType::F32)?;
        g.precision = cfg.train.precision;
        let params = at() - base;
        let mut opt = Optimizer::new(cfg.train.optimizer, &g.params);
        let slots: u64 = match cfg.train.optimizer {
            OptimizerKind::Adam | OptimizerKind::Adamw => 2,
            OptimizerKind::Sgd if cfg.train.momentum > 0.0 => 1,
            OptimizerKind::Sgd => 0,
        };
        for (id, _, p) in g.params.iter() {
            if slots >= 1 {
                opt.m[id.0] = Some(Tensor::zeros(p.shape().clone(), p.dtype(), dev)?);
            }
            if slots >= 2 {
                opt.v[id.0] = Some(Tensor::zeros(p.shape().clone(), p.dtype(), dev)?);
            }
        }
        let before = at();
        let snapshot = if cfg.train.spike_action == SpikeAction::Rollback {
            let all = g.params.values().iter().chain(opt.m.iter().flatten()).chain(opt.v.iter().flatten());
            Some(all.map(copy).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let snapshot_bytes = at() - before;
        let (b, n) = (cfg.train.batch_size, cfg.data.n);
        let before = at();
        let obs = Tensor::randn([b, 1, n, n], 1.0, 1, DType::F32, dev)?;
        let diffraction = backend::unary(backend::Unary::Abs, &obs)?;
        drop(obs);
        let y_i = Tensor::zeros([b, 1, n, n], DType::F32, dev)?;
        let y_phi = Tensor::zeros([b, 1, n, n], DType::F32, dev)?;
        let probe = loss::scaled_probe(&Tensor::full(1.0, [n, n, 2], DType::F32, dev)?, &cfg.loss)?;
        let batch = at() - before;
        Ok(SyntheticStep {
            cfg: cfg.clone(),
            g,
            opt,
            _snapshot: snapshot,
            diffraction,
            y_i,
            y_phi,
            probe,
            params,
            optimizer: params * slots,
            snapshot: snapshot_bytes,
            batch,
            slots,
        })
    }

    /// Bytes held before a step.
    pub fn resident(&self) -> u64 {
        self.params + self.optimizer + self.snapshot + self.batch
    }

    /// Forward, loss (scaled in fp16), backward and the optimiser update.
    pub fn run(&mut self) -> Result<()> {
        self.run_reading(None).map(drop)
    }

    fn run_reading(&mut self, dev: Option<&Device>) -> Result<StepReadings> {
        let cfg = &self.cfg;
        let at = || dev.map_or(0, |d| d.memory().current);
        let mut marks = Vec::new();
        let (grads, activations) = {
            let mut t = Tape::with_params(&self.g.params);
            let x = t.constant(self.diffraction.clone());
            let yi = t.constant(self.y_i.clone());
            let yp = t.constant(self.y_phi.clone());
            let start = at();
            marks.push(start);
            let out = self.g.forward_traced(&mut t, &x, &mut |_| marks.push(at()))?;
            let targets = loss::Targets { diffraction: &x, y_i: &yi, y_phi: &yp };
            let mut loss = loss::objective(&mut t, &cfg.loss, &out, &targets, &self.probe)?;
            drop(out);
            if cfg.train.precision == Precision::Fp16 {
                loss = ops::scale(&mut t, &loss, cfg.train.loss_scale_init)?;
            }
            let activations = at() - start;
            (t.backward(&loss)?.into_params(), activations)
        };
        self.opt.step(&cfg.train, &mut self.g.params, &grads, cfg.train.lr, 1.0)?;
        Ok(StepReadings { marks, activations })
    }
}

/// Runs one steady-state training step of `cfg` (batch `cfg.train.batch_size`, checkpointing
/// `cfg.model.checkpoint`) on `dev` and reads its ledger.
pub fn step_memory(cfg: &Config, dev: &Device) -> Result<StepMemory> {
    let base = dev.memory().current;
    let mut step = SyntheticStep::new(cfg, dev)?;
    dev.reset_peak();
    let r = step.run_reading(Some(dev))?;
    let peak = dev.memory().peak - base;
    let bytes = |p: usize| (p * 4) as u64;
    let parts = step
        .g
        .table()
        .iter()
        .enumerate()
        .map(|(i, row)| PartMemory {
            part: row.part.clone(),
            resolution: row.resolution,
            width: row.width,
            params: bytes(row.params),
            grads: bytes(row.params),
            optimizer: bytes(row.params) * step.slots,
            activations: r.marks.get(i + 1).zip(r.marks.get(i)).map_or(0, |(a, b)| a.saturating_sub(*b)),
        })
        .collect();
    Ok(StepMemory {
        parts,
        resident: step.resident(),
        params: step.params,
        optimizer: step.optimizer,
        snapshot: step.snapshot,
        batch: step.batch,
        activations: r.activations,
        peak,
    })
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
    let parameters = Generator::new(&cfg.model, cfg.data.n, 1, &Device::meta(), DType::F32)?.num_params();
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
                format!("{0}x{0}", a.resolution),
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
