//! The capped-width hybrid U-FNO generator (shared/REFERENCE.md section 1).
//!
//! lifter:      conv3x3(C -> w) -> GELU -> conv3x3(w -> w)
//! encoder i:   block at (r_i, c_i); its output is the skip of level i (all but the last)
//! transition:  conv2x2 stride 2 to (r_i / 2, min(2 c_i, max_channels)) while both sides of r_i
//!              are even and their halves stay at least `min_resolution`; otherwise conv3x3
//!              stride 1 at the same width, so any depth builds at any N (or H x W: the maps need
//!              not be square)
//! bottleneck:  one more block at the last level, modes / 2
//! decoder j:   (deepest first) up = the transition's adjoint (conv-transpose 2x2 stride 2, or
//!              conv3x3), concat [up, skip_j], conv3x3(2 c_j -> c_j) -> GELU -> conv3x3(c_j -> c_j)
//! head:        conv1x1(w -> 2C): [real..., imag...] of the object patch
//!
//! Parameter names follow PyTorch module paths (`encoder.0.spectral.weight`, ...); see
//! `model::weights` for the layouts. Initialisation follows PyTorch's defaults: conv weights and
//! biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); spectral weights CN(0, 1) / sqrt(C_in).

pub mod weights;

use std::fmt::Write as _;

use crate::autograd::{ParamId, ParamRole, ParamStore, Tape, Var};
use crate::backend::{Conv2dParams, NormKind, SpectralModes};
use crate::config::{BlockKind, CheckpointPolicy, Config, ModelConfig, ModelKind, PrenormKind};
use crate::data::darcy::Normalizer;
use crate::device::Device;
use crate::error::Result;
use crate::ops;
use crate::tensor::Precision;
use crate::tensor::{DType, Shape, Tensor};

const PAD1: Conv2dParams = Conv2dParams::new(1, 1);
const DOWN: Conv2dParams = Conv2dParams::new(2, 0);
const POINT: Conv2dParams = Conv2dParams::new(1, 0);

/// How one encoder level passes to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// conv2x2 stride 2: half the resolution, double the channels (capped).
    Down,
    /// conv3x3 stride 1 at the same width and resolution.
    Same,
}

/// The rows and columns of a level's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
}

impl Grid {
    pub fn square(n: usize) -> Grid {
        Grid { rows: n, cols: n }
    }
    /// The shorter side.
    pub fn min_side(self) -> usize {
        self.rows.min(self.cols)
    }
    pub fn points(self) -> usize {
        self.rows * self.cols
    }
}

impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

/// One encoder level's geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelSpec {
    pub resolution: Grid,
    pub width: usize,
    /// How this level passes to the next (None for the last level).
    pub next: Option<Transition>,
}

/// The level geometry a config gives at input size N x N.
pub fn plan_levels(cfg: &ModelConfig, n: usize) -> Vec<LevelSpec> {
    plan_grid_levels(cfg, Grid::square(n))
}

/// The level geometry a config gives on H x W maps: a level halves both sides or neither.
pub fn plan_grid_levels(cfg: &ModelConfig, grid: Grid) -> Vec<LevelSpec> {
    let mut levels = Vec::with_capacity(cfg.depth);
    let (mut r, mut c) = (grid, cfg.width);
    let halves = |n: usize| n.is_multiple_of(2) && n / 2 >= cfg.min_resolution;
    for i in 0..cfg.depth {
        let next = (i + 1 < cfg.depth).then_some({
            if halves(r.rows) && halves(r.cols) {
                Transition::Down
            } else {
                Transition::Same
            }
        });
        levels.push(LevelSpec { resolution: r, width: c, next });
        if next == Some(Transition::Down) {
            r = Grid { rows: r.rows / 2, cols: r.cols / 2 };
            c = (2 * c).min(cfg.max_channels);
        }
    }
    levels
}

#[derive(Clone, Copy, Debug)]
struct Conv {
    w: ParamId,
    b: ParamId,
}

impl Conv {
    /// The weight and bias as the GEMM sees them (cast to the working precision).
    fn wb(self, t: &mut Tape, lp: Precision) -> Result<(Var, Var)> {
        let (w, b) = (t.param(self.w)?, t.param(self.b)?);
        Ok((ops::round_to(t, &w, lp)?, ops::round_to(t, &b, lp)?))
    }
    /// conv2d in the working precision: inputs and output rounded through it (fp32 accumulation).
    fn run(self, t: &mut Tape, x: &Var, p: Conv2dParams, lp: Precision) -> Result<Var> {
        let (w, b) = self.wb(t, lp)?;
        let y = ops::conv2d(t, x, &w, Some(&b), p)?;
        ops::round_to(t, &y, lp)
    }
    /// GELU(conv(x)), rounded. In fp32 (nothing to round between the two) one fused op: the same
    /// nodes and values, one launch on a GPU.
    fn run_gelu(self, t: &mut Tape, x: &Var, p: Conv2dParams, lp: Precision) -> Result<Var> {
        if lp == Precision::Fp32 {
            let (w, b) = self.wb(t, lp)?;
            return ops::conv2d_gelu(t, x, &w, Some(&b), p);
        }
        let y = self.run(t, x, p, lp)?;
        let y = ops::gelu(t, &y)?;
        ops::round_to(t, &y, lp)
    }
    fn run_transposed(self, t: &mut Tape, x: &Var, p: Conv2dParams, lp: Precision) -> Result<Var> {
        let (w, b) = self.wb(t, lp)?;
        let y = ops::conv_transpose2d(t, x, &w, Some(&b), p)?;
        ops::round_to(t, &y, lp)
    }
}

/// GELU(a + b), each rounded to the working precision; in fp32 one fused op (the same nodes and
/// values, one launch on a GPU).
fn add_gelu(t: &mut Tape, a: &Var, b: &Var, lp: Precision) -> Result<Var> {
    if lp == Precision::Fp32 {
        return ops::add_gelu(t, a, b);
    }
    let sum = ops::add(t, a, b)?;
    let sum = ops::round_to(t, &sum, lp)?;
    let y = ops::gelu(t, &sum)?;
    ops::round_to(t, &y, lp)
}

/// Parameters of one residual block.
#[derive(Clone, Copy, Debug)]
struct Block {
    kind: BlockKind,
    prenorm: PrenormKind,
    eps: f64,
    modes: SpectralModes,
    spectral: ParamId,
    conv: Conv,
    /// LayerScale gain lambda [C].
    scale: Option<ParamId>,
    /// Normalisation gain and shift [C].
    norm_w: Option<ParamId>,
    norm_b: Option<ParamId>,
    /// Its row of the generator's table (for [`Tape::note`]).
    part: usize,
}

impl Block {
    /// GELU(Spectral(x) + Conv3x3(x)). The spectral convolution is promoted to fp32 (its FFTs
    /// and mode multiply see the rounded input exactly); its result is rounded like any
    /// activation. The sum and GELU run in the working precision.
    fn branch(&self, t: &mut Tape, x: &Var, lp: Precision) -> Result<Var> {
        let w = t.param(self.spectral)?;
        let s = ops::spectral_conv(t, x, &w, self.modes)?;
        let s = ops::round_to(t, &s, lp)?;
        let c = self.conv.run(t, x, PAD1, lp)?;
        let y = add_gelu(t, &s, &c, lp)?;
        t.note(self.part, "branch", &y)?;
        Ok(y)
    }

    /// Norms keep fp32 statistics and affine parameters; the output is rounded.
    fn norm(&self, t: &mut Tape, kind: NormKind, x: &Var, lp: Precision) -> Result<Var> {
        let g = self.norm_w.map(|p| t.param(p)).transpose()?;
        let b = self.norm_b.map(|p| t.param(p)).transpose()?;
        let y = ops::norm(t, kind, x, g.as_ref(), b.as_ref(), self.eps)?;
        ops::round_to(t, &y, lp)
    }

    fn forward(&self, t: &mut Tape, x: &Var, lp: Precision) -> Result<Var> {
        let y = match self.kind {
            BlockKind::Ptycho => {
                let br = self.branch(t, x, lp)?;
                ops::add(t, x, &br)?
            }
            BlockKind::Layerscale => {
                let br = self.branch(t, x, lp)?;
                let l = t.param(self.scale.ok_or_else(missing)?)?;
                ops::layerscale(t, x, &br, &l)?
            }
            BlockKind::LayerscaleNorm => {
                let br = self.branch(t, x, lp)?;
                let n = self.norm(t, NormKind::InstanceNorm, &br, lp)?;
                let l = t.param(self.scale.ok_or_else(missing)?)?;
                ops::layerscale(t, x, &n, &l)?
            }
            BlockKind::Prenorm => {
                let kind = match self.prenorm {
                    PrenormKind::Rms => NormKind::RmsNorm,
                    PrenormKind::Layer => NormKind::LayerNorm,
                };
                let n = self.norm(t, kind, x, lp)?;
                let br = self.branch(t, &n, lp)?;
                ops::add(t, x, &br)?
            }
            BlockKind::ZeroGamma => {
                let br = self.branch(t, x, lp)?;
                let n = self.norm(t, NormKind::InstanceNorm, &br, lp)?;
                ops::add(t, x, &n)?
            }
        };
        let y = ops::round_to(t, &y, lp)?;
        t.note(self.part, "block", &y)?;
        Ok(y)
    }
}

fn missing() -> crate::error::Error {
    crate::error::Error::Autograd("block variant built without its parameter".into())
}

#[derive(Clone, Copy, Debug)]
struct EncoderLevel {
    block: Block,
    next: Option<(Transition, Conv)>,
}

impl EncoderLevel {
    /// [block output] or [block output (the skip), input of the next level].
    fn forward(&self, t: &mut Tape, x: &Var, lp: Precision) -> Result<Vec<Var>> {
        let y = self.block.forward(t, x, lp)?;
        Ok(match self.next {
            None => vec![y],
            Some((Transition::Down, c)) => {
                let d = c.run(t, &y, DOWN, lp)?;
                vec![y, d]
            }
            Some((Transition::Same, c)) => {
                let d = c.run(t, &y, PAD1, lp)?;
                vec![y, d]
            }
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct DecoderLevel {
    up: (Transition, Conv),
    conv1: Conv,
    conv2: Conv,
}

impl DecoderLevel {
    fn forward(&self, t: &mut Tape, x: &Var, skip: &Var, lp: Precision) -> Result<Var> {
        let up = match self.up {
            (Transition::Down, c) => c.run_transposed(t, x, DOWN, lp)?,
            (Transition::Same, c) => c.run(t, x, PAD1, lp)?,
        };
        let cat = ops::concat_channels(t, &[&up, skip])?;
        drop(up);
        let h = self.conv1.run_gelu(t, &cat, PAD1, lp)?;
        drop(cat);
        self.conv2.run(t, &h, PAD1, lp)
    }
}

/// One row of the model table.
#[derive(Clone, Debug)]
pub struct TableRow {
    pub part: String,
    pub resolution: Grid,
    pub width: usize,
    /// Kept (rows, cols) of its spectral convolution, if it has one.
    pub modes: Option<(usize, usize)>,
    /// Real scalars (a complex weight counts 2 per entry).
    pub params: usize,
    /// Its parameter tensors' ids in the store (consecutive).
    pub param_ids: std::ops::Range<usize>,
}

/// The model a run trains: its parameters and how they connect (the U-FNO generator, or the
/// standard FNO-2D).
pub struct Generator {
    pub config: ModelConfig,
    /// The input maps' rows and columns.
    pub grid: Grid,
    pub in_channels: usize,
    pub params: ParamStore,
    /// The working precision of activations and GEMMs, fixed when the generator is built.
    precision: Precision,
    net: Net,
    table: Vec<TableRow>,
}

/// How the parameters connect.
enum Net {
    Ufno(Ufno),
    Fno2d(Fno2d),
}

/// The hybrid U-FNO generator's parts.
struct Ufno {
    levels: Vec<LevelSpec>,
    lifter: (Conv, Conv),
    encoder: Vec<EncoderLevel>,
    bottleneck: Block,
    decoder: Vec<DecoderLevel>,
    head: Conv,
}

/// One Fourier layer of the FNO-2D: spectral conv + 1x1 conv, GELU unless it is the last.
#[derive(Clone, Copy, Debug)]
struct FourierLayer {
    spectral: ParamId,
    linear: Conv,
    modes: SpectralModes,
    gelu: bool,
}

impl FourierLayer {
    fn forward(&self, t: &mut Tape, x: &Var, lp: Precision) -> Result<Var> {
        let w = t.param(self.spectral)?;
        let s = ops::spectral_conv(t, x, &w, self.modes)?;
        let s = ops::round_to(t, &s, lp)?;
        let c = self.linear.run(t, x, POINT, lp)?;
        if self.gelu {
            return add_gelu(t, &s, &c, lp);
        }
        let y = ops::add(t, &s, &c)?;
        ops::round_to(t, &y, lp)
    }
}

/// The standard FNO-2D (Li et al.): lift (1x1) -> Fourier layers -> 1x1 projection, GELU, 1x1
/// head; the head's output decoded by the training set's pointwise output normaliser.
struct Fno2d {
    lift: Conv,
    layers: Vec<FourierLayer>,
    projection: Conv,
    head: Conv,
    /// u = y * scale + mean per point (s x s each); identity until [`Generator::set_output_normalizer`].
    decode: Option<Normalizer>,
}

/// Builds parameters with PyTorch's default initialisation from one seeded stream.
struct Builder<'a> {
    store: ParamStore,
    dev: &'a Device,
    dtype: DType,
    seed: u64,
    /// Parameters of the part being built, for the table.
    counted: usize,
    /// The first parameter id of the part being built.
    first_id: usize,
}

impl Builder<'_> {
    fn next_seed(&mut self) -> u64 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.seed
    }

    fn add(&mut self, name: String, t: Tensor, role: ParamRole) -> Result<ParamId> {
        self.counted += t.numel();
        self.store.add(name, t, role)
    }

    fn uniform(&mut self, name: String, shape: Shape, bound: f64, role: ParamRole) -> Result<ParamId> {
        let seed = self.next_seed();
        let t = Tensor::rand_uniform(shape, -bound, bound, seed, self.dtype, self.dev)?;
        self.add(name, t, role)
    }

    fn constant(&mut self, name: String, shape: Shape, value: f64) -> Result<ParamId> {
        let t = Tensor::full(value, shape, self.dtype, self.dev)?;
        self.add(name, t, ParamRole::Gain)
    }

    /// conv weight [out, in, k, k] and bias, fan_in = in k k.
    fn conv(&mut self, prefix: &str, c_in: usize, c_out: usize, k: usize) -> Result<Conv> {
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let (wr, br) = if prefix == "head" { (ParamRole::Head, ParamRole::Head) } else { (ParamRole::Weight { unit_axis: 0 }, ParamRole::Bias) };
        Ok(Conv {
            w: self.uniform(format!("{prefix}.weight"), Shape::new([c_out, c_in, k, k]), bound, wr)?,
            b: self.uniform(format!("{prefix}.bias"), Shape::new([c_out]), bound, br)?,
        })
    }

    /// conv-transpose weight [in, out, k, k] and bias; PyTorch takes fan_in = out k k.
    fn conv_transpose(&mut self, prefix: &str, c_in: usize, c_out: usize, k: usize) -> Result<Conv> {
        let bound = 1.0 / ((c_out * k * k) as f64).sqrt();
        Ok(Conv {
            w: self.uniform(format!("{prefix}.weight"), Shape::new([c_in, c_out, k, k]), bound, ParamRole::Weight { unit_axis: 1 })?,
            b: self.uniform(format!("{prefix}.bias"), Shape::new([c_out]), bound, ParamRole::Bias)?,
        })
    }

    /// A residual block of table row `part`.
    fn block(&mut self, prefix: &str, part: usize, cfg: &ModelConfig, c: usize, r: Grid, modes: usize) -> Result<Block> {
        let modes = SpectralModes::new(modes, cfg.mode_convention);
        let ws = modes.weight_shape(c, c, r.rows, r.cols);
        // CN(0, 1) / sqrt(C_in): real and imaginary parts N(0, 1/2) each.
        let seed = self.next_seed();
        let spectral = self.add(
            format!("{prefix}.spectral.weight"),
            Tensor::randn(ws, (0.5 / c as f64).sqrt(), seed, self.dtype, self.dev)?,
            ParamRole::Weight { unit_axis: 1 },
        )?;
        let conv = self.conv(&format!("{prefix}.conv"), c, c, 3)?;
        let cs = Shape::new([c]);
        let gain = cfg.layerscale_gain();
        let (mut scale, mut norm_w, mut norm_b) = (None, None, None);
        match cfg.block {
            BlockKind::Ptycho => {}
            BlockKind::Layerscale => scale = Some(self.constant(format!("{prefix}.scale"), cs, gain)?),
            BlockKind::LayerscaleNorm => {
                norm_w = Some(self.constant(format!("{prefix}.norm.weight"), cs.clone(), 1.0)?);
                norm_b = Some(self.constant(format!("{prefix}.norm.bias"), cs.clone(), 0.0)?);
                scale = Some(self.constant(format!("{prefix}.scale"), cs, gain)?);
            }
            BlockKind::Prenorm => {
                norm_w = Some(self.constant(format!("{prefix}.norm.weight"), cs.clone(), 1.0)?);
                if cfg.prenorm == PrenormKind::Layer {
                    norm_b = Some(self.constant(format!("{prefix}.norm.bias"), cs, 0.0)?);
                }
            }
            BlockKind::ZeroGamma => {
                norm_w = Some(self.constant(format!("{prefix}.norm.weight"), cs.clone(), 0.0)?);
                norm_b = Some(self.constant(format!("{prefix}.norm.bias"), cs, 0.0)?);
            }
        }
        Ok(Block { kind: cfg.block, prenorm: cfg.prenorm, eps: cfg.norm_eps, modes, spectral, conv, scale, norm_w, norm_b, part })
    }

    fn take_count(&mut self) -> usize {
        std::mem::take(&mut self.counted)
    }

    /// The ids of the part's parameter tensors, built since the last call.
    fn take_ids(&mut self) -> std::ops::Range<usize> {
        let ids = self.first_id..self.store.len();
        self.first_id = ids.end;
        ids
    }
}

impl Generator {
    /// The model a run of `cfg` trains: inputs of `cfg.input_size()` points per side with
    /// `cfg.in_channels()` channels (the grid lines' N x N amplitudes, Darcy's (a, x, y)), f32
    /// parameters on `dev`, activations and GEMMs in `train.precision`.
    pub fn for_run(cfg: &Config, dev: &Device) -> Result<Generator> {
        // The run's GPU math: its GEMMs in TF32 or not (`train.tf32`), its convolutions'
        // algorithm (`train.gpu_conv`).
        if let Some(gpu) = dev.gpu_opt() {
            gpu.set_tf32(cfg.train.tf32);
            gpu.set_conv_columns(cfg.train.gpu_conv == crate::config::GpuConv::Columns);
        }
        Generator::build(&cfg.model, Grid::square(cfg.input_size()), cfg.in_channels(), dev, DType::F32, cfg.train.precision)
    }

    /// Builds a generator with fp32 activations for N x N inputs with `in_channels` channels, parameters on `dev`.
    pub fn new(cfg: &ModelConfig, n: usize, in_channels: usize, dev: &Device, dtype: DType) -> Result<Generator> {
        Generator::build(cfg, Grid::square(n), in_channels, dev, dtype, Precision::Fp32)
    }

    /// [`Generator::new`] for H x W inputs (the workloads' data are square; the model is not
    /// bound to it).
    pub fn new_grid(cfg: &ModelConfig, grid: Grid, in_channels: usize, dev: &Device, dtype: DType) -> Result<Generator> {
        Generator::build(cfg, grid, in_channels, dev, dtype, Precision::Fp32)
    }

    fn build(cfg: &ModelConfig, grid: Grid, in_channels: usize, dev: &Device, dtype: DType, precision: Precision) -> Result<Generator> {
        cfg.validate(grid.min_side())?;
        if in_channels == 0 {
            return Err(crate::error::Error::invalid("model", "in_channels must be at least 1"));
        }
        let mut b = Builder { store: ParamStore::new(), dev, dtype, seed: cfg.seed ^ 0x9e37_79b9_7f4a_7c15, counted: 0, first_id: 0 };
        let mut table = Vec::new();
        let net = match cfg.kind {
            ModelKind::Ufno => Net::Ufno(Self::build_ufno(cfg, grid, in_channels, &mut b, &mut table)?),
            ModelKind::Fno2d => Net::Fno2d(Self::build_fno2d(cfg, grid, in_channels, &mut b, &mut table)?),
        };
        Ok(Generator { config: cfg.clone(), grid, in_channels, params: b.store, precision, net, table })
    }

    /// The FNO-2D's parameters, initialised as the paper's script does: PyTorch's defaults for
    /// the 1x1 layers, spectral weights with real and imaginary parts U(0, 1) / (C_in C_out).
    fn build_fno2d(cfg: &ModelConfig, n: Grid, in_channels: usize, b: &mut Builder, table: &mut Vec<TableRow>) -> Result<Fno2d> {
        let w = cfg.width;
        let lift = b.conv("lift", in_channels, w, 1)?;
        table.push(TableRow { part: "lift 1x1".into(), resolution: n, width: w, modes: None, params: b.take_count(), param_ids: b.take_ids() });
        let modes = SpectralModes::new(cfg.modes, cfg.mode_convention);
        let mut layers = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let seed = b.next_seed();
            let weight = Tensor::rand_uniform(modes.weight_shape(w, w, n.rows, n.cols), 0.0, 1.0 / (w * w) as f64, seed, b.dtype, b.dev)?;
            let spectral = b.add(format!("layers.{i}.spectral.weight"), weight, ParamRole::Weight { unit_axis: 1 })?;
            let linear = b.conv(&format!("layers.{i}.linear"), w, w, 1)?;
            layers.push(FourierLayer { spectral, linear, modes, gelu: i + 1 < cfg.depth });
            table.push(TableRow {
                part: format!("layers.{i} spectral + 1x1"),
                resolution: n,
                width: w,
                modes: Some((modes.kept_rows(n.rows).len(), modes.kept_cols(n.cols))),
                params: b.take_count(),
                param_ids: b.take_ids(),
            });
        }
        let projection = b.conv("projection", w, cfg.projection, 1)?;
        let head = b.conv("head", cfg.projection, 1, 1)?;
        table.push(TableRow {
            part: "projection 1x1 + head 1x1".into(),
            resolution: n,
            width: 1,
            modes: None,
            params: b.take_count(),
            param_ids: b.take_ids(),
        });
        Ok(Fno2d { lift, layers, projection, head, decode: None })
    }

    fn build_ufno(cfg: &ModelConfig, n: Grid, in_channels: usize, b: &mut Builder, table: &mut Vec<TableRow>) -> Result<Ufno> {
        let levels = plan_grid_levels(cfg, n);
        let w = cfg.width;
        let lifter = (b.conv("lifter.0", in_channels, w, 3)?, b.conv("lifter.2", w, w, 3)?);
        table.push(TableRow { part: "lifter".into(), resolution: n, width: w, modes: None, params: b.take_count(), param_ids: b.take_ids() });
        let kept = |modes: usize, r: Grid| {
            let m = SpectralModes::new(modes, cfg.mode_convention);
            (m.kept_rows(r.rows).len(), m.kept_cols(r.cols))
        };
        let mut encoder = Vec::with_capacity(cfg.depth);
        for (i, l) in levels.iter().enumerate() {
            let block = b.block(&format!("encoder.{i}"), table.len(), cfg, l.width, l.resolution, cfg.modes)?;
            let next = match l.next {
                None => None,
                Some(tr) => {
                    let nxt = &levels[i + 1];
                    let k = if tr == Transition::Down { 2 } else { 3 };
                    Some((tr, b.conv(&format!("down.{i}"), l.width, nxt.width, k)?))
                }
            };
            encoder.push(EncoderLevel { block, next });
            table.push(TableRow {
                part: format!(
                    "encoder.{i}{}",
                    match l.next {
                        Some(Transition::Down) => " + down 2x2/2",
                        Some(Transition::Same) => " + same 3x3",
                        None => "",
                    }
                ),
                resolution: l.resolution,
                width: l.width,
                modes: Some(kept(cfg.modes, l.resolution)),
                params: b.take_count(),
                param_ids: b.take_ids(),
            });
        }
        let last = &levels[levels.len() - 1];
        let bmodes = (cfg.modes / 2).max(1);
        let bottleneck = b.block("bottleneck", table.len(), cfg, last.width, last.resolution, bmodes)?;
        table.push(TableRow {
            part: "bottleneck".into(),
            resolution: last.resolution,
            width: last.width,
            modes: Some(kept(bmodes, last.resolution)),
            params: b.take_count(),
            param_ids: b.take_ids(),
        });
        let mut decoder = Vec::new();
        for j in (0..levels.len() - 1).rev() {
            let (l, deeper) = (&levels[j], &levels[j + 1]);
            let tr = l.next.unwrap_or(Transition::Same);
            let up = match tr {
                Transition::Down => b.conv_transpose(&format!("decoder.{j}.up"), deeper.width, l.width, 2)?,
                Transition::Same => b.conv(&format!("decoder.{j}.up"), deeper.width, l.width, 3)?,
            };
            let conv1 = b.conv(&format!("decoder.{j}.conv1"), 2 * l.width, l.width, 3)?;
            let conv2 = b.conv(&format!("decoder.{j}.conv2"), l.width, l.width, 3)?;
            decoder.push(DecoderLevel { up: (tr, up), conv1, conv2 });
            table.push(TableRow {
                part: format!("decoder.{j}"),
                resolution: l.resolution,
                width: l.width,
                modes: None,
                params: b.take_count(),
                param_ids: b.take_ids(),
            });
        }
        let head = b.conv("head", w, 2 * in_channels, 1)?;
        table.push(TableRow { part: "head".into(), resolution: n, width: 2 * in_channels, modes: None, params: b.take_count(), param_ids: b.take_ids() });
        Ok(Ufno { levels, lifter, encoder, bottleneck, decoder, head })
    }

    /// FNO-2D: decode the head's output with the training set's output normaliser (what the
    /// model predicts is then u itself); the normaliser is saved with the weights.
    pub fn set_output_normalizer(&mut self, norm: Normalizer) -> Result<()> {
        let Net::Fno2d(f) = &mut self.net else {
            return Err(crate::error::Error::invalid("model", "only the fno2d model has an output normaliser"));
        };
        if norm.mean.len() != self.grid.points() || norm.std.len() != self.grid.points() {
            return Err(crate::error::Error::invalid(
                "model",
                format!("the normaliser holds {} points but the model's fields {}", norm.mean.len(), self.grid.points()),
            ));
        }
        f.decode = Some(norm);
        Ok(())
    }

    /// The output normaliser (FNO-2D with one set).
    pub fn output_normalizer(&self) -> Option<&Normalizer> {
        match &self.net {
            Net::Fno2d(f) => f.decode.as_ref(),
            Net::Ufno(_) => None,
        }
    }

    /// The working precision of activations and GEMMs.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The U-FNO's encoder levels (none for the FNO-2D).
    pub fn levels(&self) -> &[LevelSpec] {
        match &self.net {
            Net::Ufno(u) => &u.levels,
            Net::Fno2d(_) => &[],
        }
    }

    pub fn table(&self) -> &[TableRow] {
        &self.table
    }

    /// Real scalar parameters in all.
    pub fn num_params(&self) -> usize {
        self.params.num_elements()
    }

    /// x [B, C, H, W] -> [B, 2C, H, W] (real channels, then imaginary channels).
    pub fn forward(&self, t: &mut Tape, x: &Var) -> Result<Var> {
        self.forward_traced(t, x, &mut |_| {})
    }

    /// [`Generator::forward`], calling `trace(i)` after part `i` of [`Generator::table`] (lifter,
    /// encoder levels, bottleneck, decoder levels, head) has run: `fnokern plan` reads the
    /// device's ledger there to attribute the activations the tape keeps to each part.
    pub fn forward_traced(&self, t: &mut Tape, x: &Var, trace: &mut dyn FnMut(usize)) -> Result<Var> {
        let d = x.dims();
        let Grid { rows, cols } = self.grid;
        if d.len() != 4 || d[1] != self.in_channels || d[2] != rows || d[3] != cols {
            return Err(crate::error::Error::mismatch_because(
                "generator",
                x.shape(),
                &Shape::new([d.first().copied().unwrap_or(0), self.in_channels, rows, cols]),
                "input must be [B, C, H, W] as built",
            ));
        }
        match &self.net {
            Net::Ufno(u) => u.forward(t, x, self.config.checkpoint, self.precision, trace),
            Net::Fno2d(f) => f.forward(t, x, self.config.checkpoint, self.precision, trace),
        }
    }

    /// The per-level table `fnokern model` prints.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let bytes = |p: usize| p * 4;
        let _ = writeln!(s, "{:<28} {:>10} {:>7} {:>12} {:>12} {:>12}", "part", "resolution", "width", "kept modes", "parameters", "bytes (f32)");
        for r in &self.table {
            let modes = r.modes.map_or("-".to_string(), |(a, b)| format!("{a} x {b}"));
            let _ = writeln!(s, "{:<28} {:>10} {:>7} {:>12} {:>12} {:>12}", r.part, r.resolution.to_string(), r.width, modes, r.params, bytes(r.params));
        }
        let total = self.num_params();
        let _ = writeln!(s, "{:<28} {:>10} {:>7} {:>12} {:>12} {:>12}", "total", "", "", "", total, bytes(total));
        match &self.net {
            Net::Ufno(u) => {
                let _ = writeln!(
                    s,
                    "widths <= max_channels ({}): {}; parameters count real scalars (a complex spectral weight counts 2)",
                    self.config.max_channels,
                    u.levels.iter().all(|l| l.width <= self.config.max_channels)
                );
            }
            Net::Fno2d(_) => {
                let _ = writeln!(
                    s,
                    "FNO-2D: {} input channels (a, x, y), output decoded by the training set's pointwise normaliser; \
                     parameters count real scalars (a complex spectral weight counts 2)",
                    self.in_channels
                );
            }
        }
        s
    }
}

impl Ufno {
    fn forward(&self, t: &mut Tape, x: &Var, policy: CheckpointPolicy, lp: Precision, trace: &mut dyn FnMut(usize)) -> Result<Var> {
        // The lifter is checkpointed with level 0: at full resolution its two inner activations
        // are as large as any level's.
        let lifter = self.lifter;
        let mut h = segment(t, policy, 0, &[x], move |t, v| {
            let x = ops::round_to(t, &v[0], lp)?;
            let h = lifter.0.run_gelu(t, &x, PAD1, lp)?;
            Ok(vec![lifter.1.run(t, &h, PAD1, lp)?])
        })?
        .pop()
        .ok_or_else(missing)?;
        // Each part's output is noted (`Tape::note`) and traced, and the count moves on.
        let mut part = 0;
        let mut traced = |t: &Tape, p: &mut usize, out: &Var| -> Result<()> {
            t.note(*p, "output", out)?;
            trace(*p);
            *p += 1;
            Ok(())
        };
        traced(t, &mut part, &h)?;
        let mut skips = Vec::with_capacity(self.encoder.len());
        for (i, level) in self.encoder.iter().enumerate() {
            let mut outs = segment(t, policy, i, &[&h], {
                let level = *level;
                move |t, v| level.forward(t, &v[0], lp)
            })?;
            h = outs.pop().ok_or_else(missing)?;
            if let Some(skip) = outs.pop() {
                skips.push(skip);
            }
            traced(t, &mut part, &h)?;
        }
        let bottleneck = self.bottleneck;
        h = segment(t, policy, self.encoder.len(), &[&h], move |t, v| Ok(vec![bottleneck.forward(t, &v[0], lp)?]))?.pop().ok_or_else(missing)?;
        traced(t, &mut part, &h)?;
        for level in &self.decoder {
            let skip = skips.pop().ok_or_else(missing)?;
            let j = skips.len();
            h = segment(t, policy, j, &[&h, &skip], {
                let level = *level;
                move |t, v| Ok(vec![level.forward(t, &v[0], &v[1], lp)?])
            })?
            .pop()
            .ok_or_else(missing)?;
            traced(t, &mut part, &h)?;
        }
        // The head's output is the last low-precision activation; the loss runs in fp32.
        let y = self.head.run(t, &h, POINT, lp)?;
        drop(h);
        traced(t, &mut part, &y)?;
        Ok(y)
    }
}

impl Fno2d {
    fn forward(&self, t: &mut Tape, x: &Var, policy: CheckpointPolicy, lp: Precision, trace: &mut dyn FnMut(usize)) -> Result<Var> {
        let x = ops::round_to(t, x, lp)?;
        let mut h = self.lift.run(t, &x, POINT, lp)?;
        drop(x);
        t.note(0, "output", &h)?;
        trace(0);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer = *layer;
            h = segment(t, policy, i, &[&h], move |t, v| Ok(vec![layer.forward(t, &v[0], lp)?]))?.pop().ok_or_else(missing)?;
            t.note(i + 1, "output", &h)?;
            trace(i + 1);
        }
        let p = self.projection.run_gelu(t, &h, POINT, lp)?;
        drop(h);
        let y = self.head.run(t, &p, POINT, lp)?;
        drop(p);
        t.note(self.layers.len() + 1, "output", &y)?;
        trace(self.layers.len() + 1);
        match &self.decode {
            None => Ok(y),
            Some(norm) => {
                let b = y.dims()[0];
                let (scale, mean) = (norm.scale(), &norm.mean);
                let repeat = |v: &[f32]| -> Vec<f64> { (0..b).flat_map(|_| v.iter().map(|&x| x as f64)).collect() };
                let (dt, dev) = (y.value().dtype(), y.value().device().clone());
                let scale = t.constant(Tensor::from_f64_vec(repeat(&scale), y.shape().clone(), dt, &dev)?);
                let mean = t.constant(Tensor::from_f64_vec(repeat(mean), y.shape().clone(), dt, &dev)?);
                let u = ops::mul(t, &y, &scale)?;
                ops::add(t, &u, &mean)
            }
        }
    }
}

/// Outputs of convolutions (and of the spectral convolution's three steps) with at most this many
/// values per sample and channel (a map of 8 x 8, or the half spectrum of one) are kept through
/// a checkpointed segment instead of computed again in its backward. Small maps are where a deep
/// generator's channels peak: their convolutions do most of its work (2 C_in kh kw FLOPs per
/// output value: 1,152 at 64 channels, 4,608 at 512) while their values are a small part of its
/// activations. `fnokern plan` counts them in the checkpointed peak.
const KEEP_PER_CHANNEL: usize = 128;

/// Runs `body` plainly, or as a checkpointed segment when the policy covers level `i`.
fn segment<F>(t: &mut Tape, policy: CheckpointPolicy, i: usize, inputs: &[&Var], body: F) -> Result<Vec<Var>>
where
    F: Fn(&mut Tape, &[Var]) -> Result<Vec<Var>> + 'static,
{
    if policy.applies(i) {
        t.checkpoint_keeping(inputs, KEEP_PER_CHANNEL, body)
    } else {
        let owned: Vec<Var> = inputs.iter().map(|v| (*v).clone()).collect();
        body(t, &owned)
    }
}
