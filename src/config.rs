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

/// Which generator levels run as checkpointed segments: `none`, `every_level`, or `every_K`
/// (levels 0, K, 2K, ... of the encoder and of the decoder; the bottleneck is encoder level `depth`).
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
            CheckpointPolicy::EveryK(k) => i % k == 0,
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
                _ => Err(Error::invalid(
                    "checkpoint",
                    format!("`{s}` is not a policy (use none, every_level or every_K with K >= 1)"),
                )),
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

/// Spectral mode convention as written in a config: `corners` or `positive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modes {
    Corners,
    Positive,
}

impl From<Modes> for ModeConvention {
    fn from(m: Modes) -> Self {
        match m {
            Modes::Corners => ModeConvention::Corners,
            Modes::Positive => ModeConvention::Positive,
        }
    }
}

/// `[model]`: the hybrid U-FNO generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
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
    pub mode_convention: Modes,
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
            depth: 4,
            width: 32,
            modes: 12,
            max_channels: 512,
            min_resolution: 4,
            mode_convention: Modes::Corners,
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
        if self.max_channels < self.width {
            return bad(format!(
                "max_channels ({}) is below width ({}): no level could have a legal width",
                self.max_channels, self.width
            ));
        }
        if self.min_resolution == 0 || n < self.min_resolution {
            return bad(format!(
                "min_resolution ({}) must be at least 1 and at most the patch size N = {n}",
                self.min_resolution
            ));
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

/// `[data]`: the synthetic grid-lines data set (or an NPZ file in the reference layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
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
        if self.n < 2 {
            return bad(format!("n must be at least 2, got {}", self.n));
        }
        if self.npz.is_some() {
            return Ok(());
        }
        if self.object_size < self.n {
            return bad(format!("object_size ({}) is smaller than the patch size n ({})", self.object_size, self.n));
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
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::NormalizedAmplitudeMae,
            probe_scale: 0.25,
            eps: 1e-8,
        }
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

/// A whole config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub loss: LossConfig,
}

impl Config {
    /// Reads and validates a TOML config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config {
            origin: origin.to_string(),
            why: e.message().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.model.validate(self.data.n)?;
        self.loss.validate()
    }

    /// Applies one `section.key=value` override (the value in TOML syntax; bare words are strings).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| Error::invalid("--set", format!("`{assignment}` is not key=value")))?;
        let (section, field) = key
            .trim()
            .split_once('.')
            .ok_or_else(|| Error::invalid("--set", format!("`{key}` is not section.field (e.g. model.depth)")))?;
        let value = value.trim();
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut table = toml::Table::try_from(&*self).map_err(|e| Error::invalid("--set", e.to_string()))?;
        let sec = table
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .ok_or_else(|| Error::invalid("--set", format!("unknown section `{section}` (model, data, loss)")))?;
        sec.insert(field.to_string(), parsed);
        let cfg: Config = table.try_into().map_err(|e: toml::de::Error| Error::Config {
            origin: format!("--set {assignment}"),
            why: e.message().to_string(),
        })?;
        *self = cfg;
        Ok(())
    }
}
