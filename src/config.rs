//! Configuration: serde structs for `configs/*.toml`, every default in one place, and `validate()`.
//!
//! Every field is documented here; unknown keys are rejected by name. A config file holds the
//! sections `[model]`, `[data]` and `[loss]`; any section or field left out takes its default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::ModeConvention;
use crate::error::{Error, Result};
use crate::tensor::Precision;

/// The generator's residual block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Control: y = x + GELU(Spectral(x) + Conv3x3(x)).
    Ptycho,
    /// y = x + lambda * GELU(Spectral(x) + Conv3x3(x)), lambda per channel.
    Layerscale,
    /// The variant the reference ran: y = x + lambda * InstanceNorm(GELU(...)).
    LayerscaleNorm,
    /// y = x + GELU(Spectral(n) + Conv3x3(n)), n = Norm(x) (RMSNorm or LayerNorm over channels).
    Prenorm,
    /// Norm-last with a zero-initialised gain: y = x + InstanceNorm_{gamma=0}(GELU(...)).
    ZeroGamma,
}

/// The normalisation of `prenorm` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrenormKind {
    Rms,
    Layer,
}

/// How convolutions run on a GPU in FP32 (`train.gpu_conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GpuConv {
    /// fnokern's implicit-GEMM kernels: the columns gathered as they are multiplied, never
    /// written; one launch per product (two for a long weight-gradient sum).
    #[default]
    Implicit,
    /// im2col / col2im around cuBLAS SGEMMs: columns in memory, two launches or more a product.
    Columns,
}

/// Which generator levels run as checkpointed segments: `none`, `every_level`, or `every_K`
/// (levels 0, K, 2K, ... of the encoder and of the decoder; the bottleneck is encoder level `depth`;
/// the lifter is a segment of its own whenever level 0 is one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum CheckpointPolicy {
    #[default]
    None,
    EveryLevel,
    EveryK(usize),
}

impl CheckpointPolicy {
    /// Whether level `i` is a checkpointed segment.
    pub fn applies(self, i: usize) -> bool {
        match self {
            CheckpointPolicy::None => false,
            CheckpointPolicy::EveryLevel => true,
            CheckpointPolicy::EveryK(k) => i.is_multiple_of(k),
        }
    }
}

impl FromStr for CheckpointPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CheckpointPolicy::None),
            "every_level" => Ok(CheckpointPolicy::EveryLevel),
            _ => match s.strip_prefix("every_").and_then(|k| k.parse::<usize>().ok()) {
                Some(k) if k >= 1 => Ok(CheckpointPolicy::EveryK(k)),
                _ => Err(Error::invalid("checkpoint", format!("`{s}` is not a policy (use none, every_level or every_K with K >= 1)"))),
            },
        }
    }
}

impl TryFrom<String> for CheckpointPolicy {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<CheckpointPolicy> for String {
    fn from(p: CheckpointPolicy) -> String {
        p.to_string()
    }
}

impl fmt::Display for CheckpointPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointPolicy::None => f.write_str("none"),
            CheckpointPolicy::EveryLevel => f.write_str("every_level"),
            CheckpointPolicy::EveryK(k) => write!(f, "every_{k}"),
        }
    }
}

/// Which network `[model]` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The capped-width hybrid U-FNO generator (the ptychography workload).
    #[default]
    Ufno,
    /// The standard FNO-2D of Li et al. (the Darcy workload): a 1x1 lifting to `width`, `depth`
    /// Fourier layers (spectral conv + 1x1 conv, GELU between layers), a 1x1 projection to
    /// `projection` channels, GELU, and a 1x1 projection to the output.
    Fno2d,
}

/// `[model]`: the hybrid U-FNO generator, or the standard FNO-2D.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `ufno` (the generator) or `fno2d` (the standard FNO-2D, for `data.workload = "darcy"`).
    pub kind: ModelKind,
    /// fno2d: channels of the projection's hidden layer.
    pub projection: usize,
    /// Encoder levels (and decoder levels + 1). Depth beyond what N allows keeps the resolution.
    pub depth: usize,
    /// Channels of the first level.
    pub width: usize,
    /// Spectral modes per axis (the bottleneck uses modes / 2, at least 1).
    pub modes: usize,
    /// Cap on channels: a downsampling level doubles channels up to this.
    pub max_channels: usize,
    /// A level halves the map only while the result stays at least this large.
    pub min_resolution: usize,
    /// Which spectral rows are kept: `corners` (both signs of kx) or `positive` (rows 0..m).
    pub mode_convention: ModeConvention,
    /// Residual block variant.
    pub block: BlockKind,
    /// Normalisation of `prenorm` blocks: `rms` or `layer`.
    pub prenorm: PrenormKind,
    /// Initial LayerScale gain; defaults to 1e-2 (`layerscale`) or 1e-3 (`layerscale_norm`).
    pub layerscale_init: Option<f64>,
    /// eps of every normalisation.
    pub norm_eps: f64,
    /// Activation checkpointing: `none`, `every_level` or `every_K`.
    pub checkpoint: CheckpointPolicy,
    /// Seed of the parameter initialisation.
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Ufno,
            projection: 128,
            depth: 4,
            width: 32,
            modes: 12,
            max_channels: 512,
            min_resolution: 4,
            mode_convention: ModeConvention::Corners,
            block: BlockKind::Ptycho,
            prenorm: PrenormKind::Rms,
            layerscale_init: None,
            norm_eps: 1e-5,
            checkpoint: CheckpointPolicy::None,
            seed: 0,
        }
    }
}

impl ModelConfig {
    /// The LayerScale gain actually used.
    pub fn layerscale_gain(&self) -> f64 {
        self.layerscale_init.unwrap_or(match self.block {
            BlockKind::LayerscaleNorm => 1e-3,
            _ => 1e-2,
        })
    }

    pub fn validate(&self, n: usize) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("model config", why));
        if self.depth == 0 {
            return bad("depth must be at least 1".into());
        }
        if self.width == 0 || self.modes == 0 {
            return bad(format!("width ({}) and modes ({}) must be at least 1", self.width, self.modes));
        }
        if self.kind == ModelKind::Fno2d && !(1..=65_536).contains(&self.projection) {
            return bad(format!("projection must be in [1, 65536], got {}", self.projection));
        }
        // Beyond these no machine holds the model; they stop a typo before any allocation.
        if self.depth > 64 || self.width > 65_536 || self.max_channels > 65_536 || self.modes > 65_536 {
            return bad(format!(
                "depth ({}) must be at most 64 and width ({}), max_channels ({}) and modes ({}) at most 65536",
                self.depth, self.width, self.max_channels, self.modes
            ));
        }
        if self.max_channels < self.width {
            return bad(format!("max_channels ({}) is below width ({}): no level could have a legal width", self.max_channels, self.width));
        }
        if self.min_resolution == 0 || n < self.min_resolution {
            return bad(format!("min_resolution ({}) must be at least 1 and at most the patch size N = {n}", self.min_resolution));
        }
        let g = self.layerscale_gain();
        if !(g.is_finite() && g > 0.0) {
            return bad(format!("layerscale_init must be finite and > 0, got {g}"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!("norm_eps must be finite and > 0, got {}", self.norm_eps));
        }
        Ok(())
    }
}

/// What a run learns: the ptychography generator on grid-lines data, or Darcy flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Diffraction patterns -> object patches (`[data]`, the U-FNO generator, the physics losses).
    #[default]
    Gridlines,
    /// Coefficient a(x) -> solution u(x) of -div(a grad u) = 1 (`[darcy]`, `model.kind = "fno2d"`,
    /// the relative L2 or H1 loss).
    Darcy,
}

impl Workload {
    fn is_gridlines(&self) -> bool {
        *self == Workload::Gridlines
    }
}

/// `[data]`: the synthetic grid-lines data set (or an NPZ file in the reference layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `gridlines` (the fields below) or `darcy` (the `[darcy]` section; only `cache_dir` here
    /// applies). Left out of the grid-lines cache key, so old caches stay valid.
    #[serde(skip_serializing_if = "Workload::is_gridlines")]
    pub workload: Workload,
    /// Patch size N (the generator's input is N x N).
    pub n: usize,
    /// Side of each simulated object image (after the centre crop).
    pub object_size: usize,
    /// Random 1-px lines drawn in the (2x larger) image before blurring and cropping.
    pub lines: usize,
    /// Patch stride of the training and test splits.
    pub train_stride: usize,
    pub test_stride: usize,
    /// Object images per split (each split's objects are independent).
    pub train_objects: usize,
    pub test_objects: usize,
    /// Photons per pattern (Poisson noise); 0 turns the noise off.
    pub nphotons: f64,
    /// Whether the object has a phase (`set_phi`).
    pub phase: bool,
    /// Synthetic probe: disk radius as a fraction of N, edge blur (px), defocus phase at the
    /// disk's edge (radians).
    pub probe_radius: f64,
    pub probe_edge: f64,
    pub probe_defocus: f64,
    /// Seed of the simulation.
    pub seed: u64,
    /// Directory of the on-disk dataset cache (keyed by every field above).
    pub cache_dir: PathBuf,
    /// Load the training split from this NPZ (reference layout) instead of simulating, if set.
    pub npz: Option<PathBuf>,
    /// The test split's NPZ (needed with `npz`).
    pub npz_test: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            workload: Workload::Gridlines,
            n: 64,
            object_size: 392,
            lines: 400,
            train_stride: 4,
            test_stride: 10,
            train_objects: 1,
            test_objects: 1,
            nphotons: 1e9,
            phase: true,
            probe_radius: 1.0 / 6.0,
            probe_edge: 2.0,
            probe_defocus: 2.0,
            seed: 0,
            cache_dir: PathBuf::from("data-cache"),
            npz: None,
            npz_test: None,
        }
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("data config", why));
        if self.cache_dir.as_os_str().is_empty() {
            return bad("cache_dir is empty: name a directory for the data cache (the default is data-cache)".into());
        }
        if self.workload == Workload::Darcy {
            return Ok(());
        }
        if self.n < 2 || self.n > 8192 {
            return bad(format!("n must be in [2, 8192], got {}", self.n));
        }
        if self.npz.is_some() {
            return Ok(());
        }
        if self.object_size < self.n {
            return bad(format!("object_size ({}) is smaller than the patch size n ({})", self.object_size, self.n));
        }
        if self.object_size > 65_536 || self.lines > 10_000_000 || self.train_objects > 100_000 || self.test_objects > 100_000 {
            return bad(format!(
                "object_size ({}) must be at most 65536, lines ({}) at most 10^7 and objects per split at most 10^5",
                self.object_size, self.lines
            ));
        }
        if self.train_stride == 0 || self.test_stride == 0 {
            return bad("patch strides must be at least 1".into());
        }
        if self.train_objects == 0 || self.test_objects == 0 {
            return bad("each split needs at least one object".into());
        }
        if !(self.nphotons.is_finite() && self.nphotons >= 0.0) {
            return bad(format!("nphotons must be finite and >= 0, got {}", self.nphotons));
        }
        if !(self.probe_radius > 0.0 && self.probe_radius <= 0.5) {
            return bad(format!("probe_radius must be in (0, 0.5], got {}", self.probe_radius));
        }
        if !(self.probe_edge >= 0.0 && self.probe_edge.is_finite() && self.probe_defocus.is_finite()) {
            return bad("probe_edge must be >= 0 and probe_defocus finite".into());
        }
        Ok(())
    }
}

/// `[darcy]`: the Darcy flow data set of the FNO paper, generated here: -div(a grad u) = 1 on the
/// unit square, u = 0 on its boundary, a = `high` where a Gaussian random field
/// mu ~ N(0, (-Laplacian + tau^2)^-alpha) (zero Neumann conditions) is >= 0 and `low` elsewhere,
/// solved by second-order finite differences on a `resolution` x `resolution` grid and subsampled
/// by `subsample` (421 and 5 give the paper's s = 85).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DarcyConfig {
    /// Grid points per side of the solve (boundary included).
    pub resolution: usize,
    /// Keep every `subsample`-th point: s = (resolution - 1) / subsample + 1 per side.
    pub subsample: usize,
    pub train_samples: usize,
    pub test_samples: usize,
    /// The random field's smoothness alpha and inverse length scale tau.
    pub alpha: f64,
    pub tau: f64,
    /// The coefficient where the field is >= 0 and where it is < 0.
    pub high: f64,
    pub low: f64,
    /// Relative residual at which the conjugate-gradient solve stops.
    pub tolerance: f64,
    pub seed: u64,
    /// Train on existing data instead: NPZ files with arrays `coeff` and `sol`, each
    /// [samples, s, s] (the published .mat files' arrays, e.g. saved with numpy.savez), read
    /// at full size (no subsampling).
    pub npz: Option<PathBuf>,
    /// The test split's NPZ (needed with `npz`).
    pub npz_test: Option<PathBuf>,
}

impl Default for DarcyConfig {
    fn default() -> Self {
        DarcyConfig {
            resolution: 421,
            subsample: 5,
            train_samples: 1000,
            test_samples: 100,
            alpha: 2.0,
            tau: 3.0,
            high: 12.0,
            low: 3.0,
            tolerance: 1e-10,
            seed: 0,
            npz: None,
            npz_test: None,
        }
    }
}

impl DarcyConfig {
    /// Points per side of the subsampled fields the model sees.
    pub fn s(&self) -> usize {
        (self.resolution.saturating_sub(1)) / self.subsample.max(1) + 1
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("darcy config", why));
        if !(5..=4097).contains(&self.resolution) {
            return bad(format!("resolution must be in [5, 4097], got {}", self.resolution));
        }
        if self.subsample == 0 || !(self.resolution - 1).is_multiple_of(self.subsample) || self.s() < 4 {
            return bad(format!("subsample ({}) must divide resolution - 1 ({}) and leave at least 4 points per side", self.subsample, self.resolution - 1));
        }
        if self.train_samples == 0 || self.test_samples == 0 || self.train_samples > 1_000_000 || self.test_samples > 1_000_000 {
            return bad("train_samples and test_samples must be in [1, 10^6]".into());
        }
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !pos(self.alpha) || !pos(self.tau) || !pos(self.high) || !pos(self.low) {
            return bad("alpha, tau, high and low must be finite and > 0".into());
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return bad(format!("tolerance must be in (0, 1), got {}", self.tolerance));
        }
        if self.npz.is_some() != self.npz_test.is_some() {
            return bad("npz and npz_test go together: both splits are needed".into());
        }
        Ok(())
    }
}

/// The training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// mean |pred amp - obs amp| / (mean(obs amp) + eps), denominator detached (physics in the loop).
    NormalizedAmplitudeMae,
    /// Poisson negative log-likelihood of the observed intensities.
    PoissonNll,
    /// Supervised L1 on the object's amplitude and phase.
    SupervisedL1,
    /// Darcy: ||u_pred - u||_2 / ||u||_2 per sample, averaged over the batch (the FNO paper's loss).
    RelL2,
    /// Darcy: the relative H1 error per sample: sqrt(||e||^2 + ||d_x e||^2 + ||d_y e||^2) over the
    /// same of u, e = u_pred - u, derivatives by central differences at the interior points.
    H1,
}

impl LossKind {
    /// A loss of the Darcy workload (supervised on the solution field).
    pub fn is_field_loss(self) -> bool {
        matches!(self, LossKind::RelL2 | LossKind::H1)
    }
}

/// How a batch's per-sample losses combine into the objective that is differentiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Their mean.
    #[default]
    Mean,
    /// Their sum (the FNO paper's scripts: LpLoss(size_average=False)); validation and the
    /// reported losses stay means.
    Sum,
}

/// `[loss]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub kind: LossKind,
    /// The probe is multiplied by this in the forward model (the reference used 1/4).
    pub probe_scale: f64,
    /// eps of the normalised-MAE denominator.
    pub eps: f64,
    /// `mean` or `sum` of the batch's per-sample losses in the objective.
    pub reduction: Reduction,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { kind: LossKind::NormalizedAmplitudeMae, probe_scale: 0.25, eps: 1e-8, reduction: Reduction::Mean }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.probe_scale.is_finite() && self.probe_scale > 0.0) {
            return Err(Error::invalid("loss config", format!("probe_scale must be > 0, got {}", self.probe_scale)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid("loss config", format!("eps must be >= 0, got {}", self.eps)));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adam,
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipKind {
    None,
    /// Scale all gradients so that their global norm is at most `clip_max_norm` (clip_grad_norm_).
    GlobalNorm,
    /// Clamp every gradient entry to [-clip_value, clip_value].
    Value,
    /// Scale each tensor's gradient to norm at most `clip_max_norm`.
    PerParam,
    /// AGC per whole tensor, every parameter (as the reference ran it).
    AgcTensor,
    /// Unit-wise AGC (NFNets): per output channel, biases, gains and the head excluded.
    AgcUnit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    /// Linear warmup over warmup_frac of the updates, then cosine to min_lr_frac * lr.
    WarmupCosine,
    /// lr * step_gamma every step_size updates.
    Step,
    /// lr * exp_gamma^update.
    Exponential,
    /// ReduceLROnPlateau on the validation loss, per epoch.
    Plateau,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpikeAction {
    /// Count it and train on.
    Log,
    /// Count it and skip the batch.
    Skip,
    /// Restore the last good checkpoint and lower the learning rate.
    Rollback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxLoss {
    None,
    /// Supervised L1 on amplitude and phase, added to the main loss with a curriculum weight.
    SupervisedL1,
    /// The overlap term ([`crate::loss::overlap_disagreement`]): each training batch is half
    /// patterns, half their neighbours, whose predictions must agree where both are illuminated.
    Overlap,
}

/// How the final evaluation stitches test patches into the object's canvas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stitch {
    /// The reference study's: the central stride x stride region of each patch, side by side.
    #[default]
    Center,
    /// Every patch that covers a pixel, averaged with the probe's intensity as the weight: no
    /// seams, and each pixel is taken from where the patches are measured best.
    Blend,
    /// `blend` after each patch's constant phase offset (which no single diffraction pattern
    /// determines) is aligned with its neighbours': the offsets that best agree with the phase
    /// differences their overlaps show, by weighted least squares. Uses no ground truth.
    Aligned,
}

/// `[train]`: the optimisation and the stability toolkit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Activations and GEMMs in `fp32`, `bf16` or `fp16` (see [`Precision`]).
    pub precision: Precision,
    /// On a GPU, cuBLAS's GEMMs (the convolutions) in TF32 tensor-op math: their operands rounded
    /// to 10 mantissa bits, for the tensor cores' rate. No effect on the CPU. The setting is the
    /// process's for that GPU.
    pub tf32: bool,
    /// On a GPU in FP32, the convolutions as `implicit` GEMMs (fnokern's kernels, the default) or
    /// as `columns` (im2col + cuBLAS). With `tf32` they always run on cuBLAS (its tensor-op math
    /// is the TF32 path). No effect on the CPU. The setting is the process's for that GPU.
    pub gpu_conv: GpuConv,
    /// fp16's dynamic loss scaling: the first scale; x2 after `loss_scale_growth_interval` clean
    /// updates in a row; x0.5 after `loss_scale_hysteresis` overflowing updates in a row (each
    /// one skipped), never below `loss_scale_min`. A non-finite loss skips the batch and keeps
    /// the scale.
    pub loss_scale_init: f64,
    pub loss_scale_growth_interval: u64,
    pub loss_scale_hysteresis: u32,
    pub loss_scale_min: f64,
    pub batch_size: usize,
    /// Micro-batches summed into one optimiser update.
    pub accumulate: usize,
    /// Use this many training / test patterns (an evenly spaced subset); 0 means all.
    pub train_patterns: usize,
    pub test_patterns: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub clip: ClipKind,
    pub clip_max_norm: f64,
    pub clip_value: f64,
    /// AGC's lambda (both AGC kinds).
    pub agc_factor: f64,
    pub agc_eps: f64,
    pub schedule: ScheduleKind,
    pub warmup_frac: f64,
    pub min_lr_frac: f64,
    pub step_size: usize,
    pub step_gamma: f64,
    pub exp_gamma: f64,
    pub plateau_factor: f64,
    pub plateau_patience: usize,
    pub min_lr: f64,
    pub aux_loss: AuxLoss,
    /// The auxiliary term's weight: 0 for aux_warmup_steps updates, then a linear ramp over
    /// aux_ramp_steps, then aux_weight.
    pub aux_weight: f64,
    pub aux_warmup_steps: usize,
    pub aux_ramp_steps: usize,
    /// A loss above spike_factor times the mean of the last spike_window losses is a spike.
    pub spike_factor: f64,
    pub spike_window: usize,
    pub spike_action: SpikeAction,
    /// Learning-rate multiplier applied at each rollback.
    pub rollback_lr_factor: f64,
    /// After a rollback the rate climbs back from its cut to the schedule's over this many
    /// updates (linearly); 0 keeps the cut for the rest of the run.
    pub rollback_rewarmup: usize,
    /// An epoch's end becomes a rollback point only if its weights are finite and its
    /// validation loss is at most good_point_factor x the best so far (epoch 1: x the first
    /// step's loss): a blown-up state is never one.
    pub good_point_factor: f64,
    /// How many rollback points are kept: a rollback goes to the newest, or, while the rate is
    /// still climbing back from the last rollback (rollback_rewarmup), one point older than that.
    pub rollback_points: usize,
    /// This many failed steps in a row (skipped or rolled back) stop the run as crashed.
    pub max_consecutive_failures: usize,
    /// Keep a checkpoint every this many epochs (besides last and best); 0: only last and best.
    pub checkpoint_every: usize,
    /// Log each part's gradient norm (before clipping) at every update in metrics.jsonl
    /// (`layer_grad_norm`, the parts as `fnokern model` lists them): one reduction per update.
    pub log_layers: bool,
    /// Shuffling seed.
    pub seed: u64,
    /// `cpu`, or `cuda` / `cuda:N` for a GPU (f32 storage; low precision emulated by rounding).
    pub device: String,
    /// Device memory budget (e.g. `24GiB`): an allocation that would exceed it stops the run as
    /// out of memory, as a card of that size would. Unset: no budget.
    pub memory_limit: Option<String>,
    /// Final evaluation: stitch and score the test object (Darcy: score the whole test split).
    pub evaluate: bool,
    /// How the final evaluation stitches the test patches into the object (see [`Stitch`]).
    pub stitch: Stitch,
    /// Score the best epoch's weights (checkpoints/best.safetensors, the lowest validation loss)
    /// rather than the last epoch's; weights.safetensors keeps the last.
    pub evaluate_best: bool,
    /// Data seeds of the objects the final evaluation scores: for each, the run's data
    /// simulated with `data.seed` set to it, and its first test object stitched and scored;
    /// summary.json's metrics are their mean (sd and each object's beside). The run's own test
    /// object is the validation object (validation loss, best epoch, every choice), so these are
    /// objects no choice has seen. Empty: score the run's own test object.
    pub eval_seeds: Vec<u64>,
    /// Early stopping: end the run after this many epochs in a row without a validation loss
    /// below the best so far minus `early_stopping_min_delta`; 0 turns it off.
    pub early_stopping_patience: usize,
    pub early_stopping_min_delta: f64,
    /// An early-stopped run's weights.safetensors holds the best epoch's parameters.
    pub early_stopping_restore_best: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 50,
            precision: Precision::Fp32,
            tf32: false,
            gpu_conv: GpuConv::Implicit,
            loss_scale_init: 65536.0,
            loss_scale_growth_interval: 2000,
            loss_scale_hysteresis: 1,
            loss_scale_min: 1.0,
            batch_size: 16,
            accumulate: 1,
            train_patterns: 0,
            test_patterns: 0,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            nesterov: false,
            clip: ClipKind::GlobalNorm,
            clip_max_norm: 1.0,
            clip_value: 1.0,
            agc_factor: 0.1,
            agc_eps: 1e-3,
            schedule: ScheduleKind::Constant,
            warmup_frac: 0.03,
            min_lr_frac: 0.1,
            step_size: 1000,
            step_gamma: 0.5,
            exp_gamma: 0.9999,
            plateau_factor: 0.5,
            plateau_patience: 2,
            min_lr: 5e-5,
            aux_loss: AuxLoss::None,
            aux_weight: 0.1,
            aux_warmup_steps: 0,
            aux_ramp_steps: 0,
            spike_factor: 3.0,
            spike_window: 20,
            spike_action: SpikeAction::Rollback,
            rollback_lr_factor: 0.5,
            rollback_rewarmup: 100,
            good_point_factor: 2.0,
            rollback_points: 2,
            max_consecutive_failures: 10,
            checkpoint_every: 0,
            log_layers: false,
            seed: 0,
            device: "cpu".into(),
            memory_limit: None,
            evaluate: true,
            evaluate_best: false,
            eval_seeds: Vec::new(),
            stitch: Stitch::Center,
            early_stopping_patience: 0,
            early_stopping_min_delta: 0.0,
            early_stopping_restore_best: true,
        }
    }
}

impl TrainConfig {
    /// The device `device` names; `auto` is GPU 0 when one is usable, else the CPU.
    pub fn device_kind(&self) -> Result<crate::device::DeviceKind> {
        if self.device.trim() == "auto" {
            return Ok(crate::device::auto_kind().0);
        }
        crate::device::DeviceKind::parse(&self.device)
    }

    /// The memory budget in bytes, if any.
    pub fn memory_limit_bytes(&self) -> Result<Option<u64>> {
        self.memory_limit.as_deref().map(crate::device::parse_bytes).transpose()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("train config", why));
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if self.epochs == 0 || self.batch_size == 0 || self.accumulate == 0 {
            return bad("epochs, batch_size and accumulate must be at least 1".into());
        }
        if self.epochs > 1_000_000 || self.batch_size > 1 << 20 || self.accumulate > 1 << 20 {
            return bad(format!("epochs ({}) must be at most 10^6 and batch_size and accumulate at most 2^20", self.epochs));
        }
        if !pos(self.lr) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) || !pos(self.adam_eps) {
            return bad("beta1 and beta2 must be in [0, 1) and adam_eps > 0".into());
        }
        if !nonneg(self.weight_decay) || !(0.0..1.0).contains(&self.momentum) {
            return bad("weight_decay must be >= 0 and momentum in [0, 1)".into());
        }
        if !pos(self.clip_max_norm) || !pos(self.clip_value) || !pos(self.agc_factor) || !pos(self.agc_eps) {
            return bad("clip_max_norm, clip_value, agc_factor and agc_eps must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.warmup_frac) || !(0.0..=1.0).contains(&self.min_lr_frac) {
            return bad("warmup_frac must be in [0, 1) and min_lr_frac in [0, 1]".into());
        }
        if self.step_size == 0 || !pos(self.step_gamma) || !pos(self.exp_gamma) || !pos(self.plateau_factor) || self.plateau_factor >= 1.0 {
            return bad("step_size >= 1; step_gamma, exp_gamma > 0; plateau_factor in (0, 1)".into());
        }
        if !nonneg(self.min_lr) || !nonneg(self.aux_weight) {
            return bad("min_lr and aux_weight must be >= 0".into());
        }
        if !(self.spike_factor > 1.0 && self.spike_factor.is_finite()) || self.spike_window == 0 {
            return bad("spike_factor must be > 1 and spike_window >= 1".into());
        }
        if !(self.rollback_lr_factor > 0.0 && self.rollback_lr_factor <= 1.0) || self.max_consecutive_failures == 0 {
            return bad("rollback_lr_factor must be in (0, 1] and max_consecutive_failures >= 1".into());
        }
        if !(self.good_point_factor >= 1.0 && self.good_point_factor.is_finite()) {
            return bad(format!("good_point_factor must be a finite number >= 1, got {}", self.good_point_factor));
        }
        if !(1..=16).contains(&self.rollback_points) || self.rollback_rewarmup > 1_000_000_000 {
            return bad(format!(
                "rollback_points must be in [1, 16] (got {}) and rollback_rewarmup at most 10^9 (got {})",
                self.rollback_points, self.rollback_rewarmup
            ));
        }
        if !(pos(self.loss_scale_init) && pos(self.loss_scale_min) && self.loss_scale_min <= self.loss_scale_init)
            || self.loss_scale_growth_interval == 0
            || self.loss_scale_hysteresis == 0
        {
            return bad("loss_scale_init >= loss_scale_min > 0, loss_scale_growth_interval >= 1 and loss_scale_hysteresis >= 1".into());
        }
        // fp16's largest value is 65504: a scale far beyond 2^24 overflows every gradient, and the
        // halving back would take most of a run.
        if self.loss_scale_init > MAX_LOSS_SCALE {
            return bad(format!("loss_scale_init ({}) must be at most 2^24 = {MAX_LOSS_SCALE} (PyTorch starts at 2^16)", self.loss_scale_init));
        }
        if !nonneg(self.early_stopping_min_delta) {
            return bad(format!("early_stopping_min_delta must be finite and >= 0, got {}", self.early_stopping_min_delta));
        }
        if let Some(m) = &self.memory_limit {
            crate::device::parse_bytes(m).map_err(|e| Error::invalid("train config", format!("memory_limit: {e}")))?;
        }
        // `auto` is resolved when the run starts (probing a GPU is not validation's business).
        let kind = if self.device.trim() == "auto" { Ok(crate::device::DeviceKind::Cpu) } else { crate::device::DeviceKind::parse(&self.device) };
        match kind {
            Ok(crate::device::DeviceKind::Meta) => return bad("device `meta` has no data to train on (use cpu, cuda, cuda:N or auto)".into()),
            Ok(_) => {}
            Err(_) => return bad(format!("device `{}`: use cpu, cuda, cuda:N or auto", self.device)),
        }
        Ok(())
    }
}

/// The largest initial fp16 loss scale a config may ask for (2^24).
pub const MAX_LOSS_SCALE: f64 = 16_777_216.0;

/// `[faults]`: deliberate faults, to test the guards. Steps count micro-batches from 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Fill these steps' input batches with NaN.
    pub nan_input_steps: Vec<u64>,
    /// Multiply these steps' losses by spike_scale.
    pub spike_steps: Vec<u64>,
    /// Make these steps' generator outputs NaN (a non-finite forward pass).
    pub nan_forward_steps: Vec<u64>,
    /// Update at spike_scale x the rate at these steps: a bad update whose damage shows only
    /// later (at an epoch's last step, in that epoch's validation).
    pub bad_update_steps: Vec<u64>,
    pub spike_scale: f64,
}

impl FaultConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.spike_scale.is_finite() && self.spike_scale > 0.0) {
            return Err(Error::invalid("faults config", format!("spike_scale must be finite and > 0, got {}", self.spike_scale)));
        }
        Ok(())
    }
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig { nan_input_steps: Vec::new(), spike_steps: Vec::new(), nan_forward_steps: Vec::new(), bad_update_steps: Vec::new(), spike_scale: 100.0 }
    }
}

/// A whole config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub loss: LossConfig,
    pub train: TrainConfig,
    pub faults: FaultConfig,
    pub darcy: DarcyConfig,
}

impl Config {
    /// Reads and validates a TOML config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config { origin: origin.to_string(), why: e.message().to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        if self.data.workload == Workload::Darcy {
            self.darcy.validate()?;
        }
        self.model.validate(self.input_size())?;
        self.loss.validate()?;
        self.faults.validate()?;
        self.train.validate()?;
        let darcy = self.data.workload == Workload::Darcy;
        let bad = |why: &str| Err(Error::invalid("config", why.to_string()));
        if darcy != (self.model.kind == ModelKind::Fno2d) {
            return bad("model.kind = \"fno2d\" goes with data.workload = \"darcy\" (and \"ufno\" with \"gridlines\")");
        }
        if darcy != self.loss.kind.is_field_loss() {
            return bad("the Darcy workload trains with loss.kind = \"rel_l2\" or \"h1\", and only it does");
        }
        if darcy && self.train.aux_loss != AuxLoss::None {
            return bad("train.aux_loss is a grid-lines term: set it to \"none\" for Darcy");
        }
        if !self.train.eval_seeds.is_empty() {
            if darcy || self.data.npz.is_some() {
                return bad("train.eval_seeds scores simulated grid-lines objects: leave it empty for Darcy and NPZ data");
            }
            let seeds = &self.train.eval_seeds;
            if seeds.contains(&self.data.seed) || (1..seeds.len()).any(|i| seeds[..i].contains(&seeds[i])) {
                return bad("train.eval_seeds must not repeat a seed or hold data.seed (whose test object is the validation object)");
            }
            if seeds.len() > 1000 {
                return bad("train.eval_seeds holds at most 1000 seeds");
            }
        }
        if self.train.aux_loss == AuxLoss::Overlap && self.train.batch_size < 2 {
            return bad("train.aux_loss = \"overlap\" pairs each pattern with a neighbour: train.batch_size must be at least 2");
        }
        Ok(())
    }

    /// Points per side of the model's input: `data.n`, or the Darcy fields' s.
    pub fn input_size(&self) -> usize {
        match self.data.workload {
            Workload::Gridlines => self.data.n,
            Workload::Darcy => self.darcy.s(),
        }
    }

    /// Channels of the model's input: the diffraction amplitude, or Darcy's (a, x, y).
    pub fn in_channels(&self) -> usize {
        match self.data.workload {
            Workload::Gridlines => 1,
            Workload::Darcy => 3,
        }
    }

    /// Applies one `section.key=value` override (the value in TOML syntax; bare words are strings).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| Error::invalid("--set", format!("`{assignment}` is not key=value")))?;
        let (section, field) = key.trim().split_once('.').ok_or_else(|| Error::invalid("--set", format!("`{key}` is not section.field (e.g. model.depth)")))?;
        let value = value.trim();
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut table = toml::Table::try_from(&*self).map_err(|e| Error::invalid("--set", e.to_string()))?;
        let sec = table
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .ok_or_else(|| Error::invalid("--set", format!("unknown section `{section}` (model, data, loss, train, faults, darcy)")))?;
        sec.insert(field.to_string(), parsed);
        let cfg: Config =
            table.try_into().map_err(|e: toml::de::Error| Error::Config { origin: format!("--set {assignment}"), why: e.message().to_string() })?;
        *self = cfg;
        Ok(())
    }
}

/// Named starting points for `fnokern train`.
pub mod presets {
    use super::*;

    /// (name, one-line description) of every preset.
    pub const ALL: &[(&str, &str)] = &[
        (
            "cpu",
            "a depth-8 capped-width generator sized to train in 5-8 minutes on two CPU cores \
             (N 32, width 8, max_channels 64, modes 6, probe defocus 10 rad, 2048 training patterns from 2 objects, 32 epochs, \
             warmup + cosine, the overlap term, spikes logged, aligned stitching, scored on 3 unseen test objects)",
        ),
        (
            "sweep",
            "the crash hunt's and shootout's small scale: one run in one to three minutes on one CPU core \
             (N 32, width 8, max_channels 64, modes 6, 512 training patterns from 1 object, 12 epochs, Adam 1e-3 constant)",
        ),
        (
            "map",
            "the stability map's scale: one run in 5-15 seconds on one CPU core (N 16, width 8, max_channels 32, modes 4, \
             441 training patterns from 1 object of 96 px, 4 epochs, Adam constant, quality scored on the best epoch)",
        ),
        (
            "study",
            "the published reference study's setting, meant for a GPU: N 64, width 32, max_channels 512, modes 12, \
             batch 16, Adam 1e-3, global-norm clipping 1.0, 50 epochs, no phase in the data",
        ),
        (
            "darcy",
            "the FNO paper's Darcy benchmark (configs/darcy-fno2d.toml): FNO-2D width 32, 4 layers, 12 modes, s 85, \
             1000 + 100 generated samples, relative L2 loss, Adam 1e-3 with weight decay 1e-4, batch 20, 500 epochs, \
             the rate halved every 100 epochs",
        ),
    ];

    /// The one-line description of preset `name` ("" for an unknown name).
    pub fn describe(name: &str) -> &'static str {
        ALL.iter().find(|p| p.0 == name).map_or("", |p| p.1)
    }

    pub fn get(name: &str) -> Result<Config> {
        let mut c = Config::default();
        // What the two CPU presets share: a capped-width generator at N 32 on small objects.
        let small = |c: &mut Config| {
            c.model.width = 8;
            c.model.max_channels = 64;
            c.model.modes = 6;
            c.data.n = 32;
            c.data.object_size = 160;
            c.data.lines = 100;
            c.data.train_stride = 4;
            c.data.test_stride = 8;
            c.train.batch_size = 16;
        };
        match name {
            "cpu" => {
                small(&mut c);
                c.model.depth = 8;
                c.data.train_objects = 2;
                // What docs/experiments/reconstruction measured: a probe with more phase
                // structure (defocus 10 rad at its edge, not 2) conditions the single-pattern
                // inversion; the overlap term makes neighbouring patches agree on the phase
                // offset the physics loss cannot see; aligned stitching removes the seams and the
                // offsets that remain.
                c.data.probe_defocus = 10.0;
                c.train.aux_loss = AuxLoss::Overlap;
                c.train.aux_weight = 1.0;
                c.train.stitch = Stitch::Aligned;
                // The warmup's one loss spike (step 32 or 44) rolled the run back to its initial
                // weights at half the rate for good, which cost it 0.06 amplitude SSIM; the loss
                // comes back by itself, so the spike is logged (and plotted) instead. Non-finite
                // values are still skipped.
                c.train.spike_action = SpikeAction::Log;
                c.train.epochs = 32;
                c.train.train_patterns = 2048;
                c.train.test_patterns = 128;
                c.train.schedule = ScheduleKind::WarmupCosine;
                // Scored on three objects no choice has seen; the run's own test object is the
                // validation object every choice above was made on.
                c.train.eval_seeds = vec![1001, 1002, 1003];
            }
            "sweep" => {
                small(&mut c);
                c.model.depth = 6;
                c.train.epochs = 12;
                c.train.train_patterns = 512;
                c.train.test_patterns = 64;
            }
            "map" => {
                // Small enough for hundreds of runs; large enough that the control diverges
                // at the top of the learning-rate grid (3e-2 at depth 8).
                small(&mut c);
                c.model.depth = 6;
                c.model.max_channels = 32;
                c.model.modes = 4;
                c.data.n = 16;
                c.data.object_size = 96;
                c.data.lines = 60;
                c.train.epochs = 4;
                c.train.train_patterns = 512;
                c.train.test_patterns = 64;
                c.train.evaluate_best = true;
            }
            "study" => {
                c.data.phase = false;
                c.train.epochs = 50;
            }
            "darcy" => {
                c.data.workload = Workload::Darcy;
                c.model.kind = ModelKind::Fno2d;
                c.model.depth = 4;
                c.model.width = 32;
                c.model.modes = 12;
                c.model.projection = 128;
                c.loss.kind = LossKind::RelL2;
                c.loss.reduction = Reduction::Sum;
                c.train.epochs = 500;
                c.train.batch_size = 20;
                c.train.lr = 1e-3;
                c.train.weight_decay = 1e-4;
                c.train.clip = ClipKind::None;
                c.train.schedule = ScheduleKind::Step;
                // 100 epochs of 1000 / 20 updates.
                c.train.step_size = 5000;
                c.train.step_gamma = 0.5;
                c.train.spike_action = SpikeAction::Log;
            }
            other => {
                let names: Vec<&str> = ALL.iter().map(|p| p.0).collect();
                return Err(Error::invalid("preset", format!("no preset `{other}` (presets: {})", names.join(", "))));
            }
        }
        Ok(c)
    }
}
