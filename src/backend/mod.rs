//! The backend boundary: the small set of kernels every device implements, and the dispatch
//! functions that validate operands, allocate outputs through the device's ledger and call the
//! device's kernels.
//!
//! Kernels write into outputs that the dispatch functions made; they never allocate tensors. That
//! single rule is what lets the meta backend (whose kernels do nothing) count exactly the bytes the
//! CPU backend uses. Everything above this module is device-agnostic.
//!
//! Layouts: activations are NCHW, row-major. Complex tensors carry a trailing dimension of 2
//! (re, im). Conv weights are [C_out, C_in, kh, kw]; transposed-conv weights [C_in, C_out, kh, kw];
//! spectral weights [C_in, C_out, R, M_y, 2] for the R kept rows and M_y kept columns.

pub mod cpu;
pub mod cuda;
pub mod meta;

use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Stride and zero padding of a 2-D convolution; the kernel size comes from the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dParams {
    pub const fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams { stride, padding }
    }
}

/// Which rows (kx) of the half spectrum a spectral convolution keeps (`corners` or `positive` in
/// a config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeConvention {
    /// Rows 0..m and H-m..H: both signs of kx (the standard FNO).
    #[default]
    Corners,
    /// Rows 0..m only (positive kx), as the reference system ran.
    Positive,
}

/// The kept modes of a spectral convolution: `modes` per axis, clamped to what an H x W map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpectralModes {
    pub modes: usize,
    pub convention: ModeConvention,
}

impl SpectralModes {
    pub fn new(modes: usize, convention: ModeConvention) -> Self {
        SpectralModes { modes, convention }
    }

    /// Rows of an H-row spectrum that are kept, in weight order. Corners keeps the non-negative
    /// frequencies 0..min(m, ceil(H/2)) then the negative ones H-min(m, floor(H/2))..H, so no row is
    /// kept twice however small H is.
    pub fn kept_rows(&self, h: usize) -> Vec<usize> {
        match self.convention {
            ModeConvention::Positive => (0..self.modes.min(h)).collect(),
            ModeConvention::Corners => {
                let pos = self.modes.min(h.div_ceil(2));
                let neg = self.modes.min(h / 2);
                (0..pos).chain(h - neg..h).collect()
            }
        }
    }

    /// Columns of the half spectrum (W/2+1 of them) that are kept: min(m, W/2+1).
    pub fn kept_cols(&self, w: usize) -> usize {
        self.modes.min(w / 2 + 1)
    }

    /// The shape of the weight for `c_in` -> `c_out` channels on an H x W map.
    pub fn weight_shape(&self, c_in: usize, c_out: usize, h: usize, w: usize) -> Shape {
        Shape::new([c_in, c_out, self.kept_rows(h).len(), self.kept_cols(w), 2])
    }
}

/// Element-wise functions with a derivative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// x * Phi(x), the exact (erf) form.
    Gelu,
    /// |x|, derivative sign(x) with 0 at 0.
    Abs,
    /// sqrt(x), derivative 1 / (2 sqrt(x)).
    Sqrt,
    /// x^2.
    Square,
    /// ln x.
    Log,
    /// The angle wrapped to [-pi, pi): x - 2 pi round(x / 2 pi); derivative 1.
    WrapAngle,
    /// x rounded to the nearest IEEE half (f16; ties to even; beyond +-65504 it is +-inf), as a
    /// GPU stores an fp16 activation. Used by `ops::round_to`, whose backward rounds the gradient.
    RoundF16,
    /// x rounded to the nearest bfloat16 (ties to even).
    RoundBf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    SumSq,
}

/// Normalisations. Statistics are accumulated in f64 on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Over the channels of each pixel: (x - mean) / sqrt(var + eps).
    LayerNorm,
    /// Over the channels of each pixel: x / sqrt(mean(x^2) + eps).
    RmsNorm,
    /// Over H x W of each sample and channel: (x - mean) / sqrt(var + eps).
    InstanceNorm,
}

impl NormKind {
    pub fn over_channels(self) -> bool {
        matches!(self, NormKind::LayerNorm | NormKind::RmsNorm)
    }
    pub fn centres(self) -> bool {
        !matches!(self, NormKind::RmsNorm)
    }
}

/// A tensor viewed as [pre, units, post]: the units of adaptive gradient clipping along one axis.
pub type Units = (usize, usize, usize);

/// One Adam/AdamW update (PyTorch's formulas). `grad_scale` multiplies the gradient first (the
/// clipping factor and 1/accumulation steps folded in).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (p *= 1 - lr wd) rather than Adam's L2 term (g += wd p).
    pub decoupled: bool,
    /// The 1-based update count, for bias correction.
    pub step: u64,
    pub grad_scale: f64,
}

/// One SGD update (PyTorch's formulas, dampening 0).
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// The first update (the momentum buffer starts as the gradient).
    pub first: bool,
    pub grad_scale: f64,
}

/// The kernels of one device. Outputs are fresh tensors made by the dispatch functions below, of
/// the right shape and dtype; inputs have been validated.
pub trait Backend: Sync {
    fn unary(&self, op: Unary, x: &Tensor, y: &mut Tensor) -> Result<()>;
    fn unary_bwd(&self, op: Unary, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()>;
    fn binary(&self, op: Binary, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()>;
    /// acc += other, in place (acc is uniquely held).
    fn add_assign(&self, acc: &mut Tensor, other: &Tensor) -> Result<()>;
    /// y[b, c, s] += bias[c].
    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor) -> Result<()>;
    /// y = alpha x + beta.
    fn affine(&self, x: &Tensor, alpha: f64, beta: f64, y: &mut Tensor) -> Result<()>;
    /// y = x * s, or x / s when `divide`; s has one element.
    fn scale_by(&self, x: &Tensor, s: &Tensor, divide: bool, y: &mut Tensor) -> Result<()>;
    /// y (one element) = sum x or sum x^2.
    fn reduce(&self, op: Reduce, x: &Tensor, y: &mut Tensor) -> Result<()>;
    /// y[t] = sum xs[t] or sum xs[t]^2 for each tensor (y [T]): each entry is what `reduce` gives.
    fn reduce_each(&self, op: Reduce, xs: &[&Tensor], y: &mut Tensor) -> Result<()>;
    /// y (one element) = sum a * b.
    fn dot(&self, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()>;
    /// y = g * x with g broadcast from one element.
    fn broadcast_scalar(&self, g: &Tensor, x: &Tensor, y: &mut Tensor) -> Result<()>;
    /// x as [B, C, S]: y[b, c, s] = x[b, c, s] * l[c].
    fn channel_scale(&self, x: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()>;
    /// y[c] = sum over b, s of a[b, c, s] * b[b, c, s] (or of a alone).
    fn channel_dot(&self, a: &Tensor, b: Option<&Tensor>, y: &mut Tensor) -> Result<()>;
    /// The LayerScale residual y = x + l[c] * branch.
    fn layerscale_fwd(&self, x: &Tensor, branch: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()>;
    /// Its backward for the branch and the gains: dbranch = l[c] dy, dl[c] = sum over b, s of
    /// dy * branch (dx = dy needs no kernel).
    fn layerscale_bwd(&self, dy: &Tensor, branch: &Tensor, l: &Tensor, dbranch: &mut Tensor, dl: &mut Tensor) -> Result<()>;
    /// dst[:, offset .. offset + C_src] = src (both [B, C, S]).
    fn copy_channels(&self, src: &Tensor, dst: &mut Tensor, offset: usize) -> Result<()>;
    /// dst = src[:, offset .. offset + C_dst].
    fn slice_channels(&self, src: &Tensor, offset: usize, dst: &mut Tensor) -> Result<()>;
    fn conv2d_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams, y: &mut Tensor) -> Result<()>;
    fn conv2d_bwd_input(&self, dy: &Tensor, w: &Tensor, p: Conv2dParams, dx: &mut Tensor) -> Result<()>;
    fn conv2d_bwd_weight(&self, x: &Tensor, dy: &Tensor, p: Conv2dParams, dw: &mut Tensor) -> Result<()>;
    /// Unnormalised real-to-half-complex 2-D FFT over the last two dimensions.
    fn rfft2(&self, x: &Tensor, y: &mut Tensor) -> Result<()>;
    /// The adjoint of `rfft2`.
    fn rfft2_bwd(&self, dy: &Tensor, dx: &mut Tensor) -> Result<()>;
    /// Inverse of `rfft2` with 1/(HW) scaling; DC and Nyquist columns are taken by their Hermitian
    /// part (the imaginary part of their inverse is dropped).
    fn irfft2(&self, z: &Tensor, y: &mut Tensor) -> Result<()>;
    /// The adjoint of `irfft2`.
    fn irfft2_bwd(&self, dy: &Tensor, dz: &mut Tensor) -> Result<()>;
    fn spectral_mix_fwd(&self, xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()>;
    fn spectral_mix_bwd_input(&self, dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()>;
    fn spectral_mix_bwd_weight(&self, xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn norm_fwd(
        &self,
        kind: NormKind,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        kind: NormKind,
        x: &Tensor,
        dy: &Tensor,
        gamma: Option<&Tensor>,
        mean: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        dgamma: Option<&mut Tensor>,
        dbeta: Option<&mut Tensor>,
    ) -> Result<()>;
    /// y = z * p (or z * conj(p)), p [H, W, 2] broadcast over the leading dimensions of z.
    fn complex_mul(&self, z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()>;
    /// Complex 2-D FFT over dimensions (H, W) of [.., H, W, 2], times `scale`.
    fn fft2(&self, z: &Tensor, inverse: bool, scale: f64, y: &mut Tensor) -> Result<()>;
    /// Circular shift by (sh, sw) of the (H, W) dimensions; `complex` says a trailing 2 follows them.
    fn roll2d(&self, x: &Tensor, sh: usize, sw: usize, complex: bool, y: &mut Tensor) -> Result<()>;
    fn complex_abs(&self, z: &Tensor, y: &mut Tensor) -> Result<()>;
    fn complex_abs_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()>;
    /// y = arg z = atan2(im, re).
    fn complex_angle(&self, z: &Tensor, y: &mut Tensor) -> Result<()>;
    /// dz = dy (-im, re) / |z|^2, defined as 0 at z = 0.
    fn complex_angle_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()>;
    /// [B, 2C, S] channels (real then imaginary) to [B, C, S, 2], or back when `unpack`.
    fn pack_complex(&self, x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()>;
    /// In place: the Adam/AdamW update of p with gradient g and moments m, v.
    fn adam_step(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()>;
    /// In place: the SGD update of p, with its momentum buffer when momentum > 0.
    fn sgd_step(&self, p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()>;
    /// Adaptive gradient clipping in place, w and g viewed as [pre, units, post]: per unit u,
    /// g_u *= min(1, lambda max(|w_u|, eps) / |g_u|) (unchanged when |g_u| = 0).
    fn agc(&self, w: &Tensor, g: &mut Tensor, units: Units, lambda: f64, eps: f64) -> Result<()>;
    /// In place: x = clamp(x, -c, c).
    fn clamp(&self, x: &mut Tensor, c: f64) -> Result<()>;
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

fn check_compute(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_compute() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype: t.dtype(), why: "kernels compute in f32 or f64; cast f16/bf16 storage first" })
    }
}

/// All operands share one device and one compute dtype.
fn check_same(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let first = ts[0];
    check_compute(op, first)?;
    for t in &ts[1..] {
        if t.device() != first.device() {
            return Err(Error::DeviceMismatch { op, lhs: first.device().to_string(), rhs: t.device().to_string() });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DTypeMismatch { op, lhs: first.dtype(), rhs: t.dtype() });
        }
    }
    Ok(())
}

fn check_rank(op: &'static str, t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), format!("{what} must have {rank} dimensions")))
    }
}

fn check_eq(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(Error::mismatch(op, a.shape(), b.shape()))
    }
}

fn check_complex(op: &'static str, t: &Tensor, min_rank: usize) -> Result<()> {
    if t.rank() >= min_rank && t.dims()[t.rank() - 1] == 2 {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), format!("expected a complex tensor: at least {min_rank} dimensions, the last of size 2")))
    }
}

fn check_one(op: &'static str, t: &Tensor) -> Result<()> {
    if t.numel() == 1 {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), "expected a one-element tensor"))
    }
}

/// [B, C, S...] views: (B, C, S).
fn bcs(t: &Tensor) -> (usize, usize, usize) {
    let d = t.dims();
    (d[0], d[1], d[2..].iter().product())
}

fn with_out<F>(shape: impl Into<Shape>, like: &Tensor, f: F) -> Result<Tensor>
where
    F: FnOnce(&mut Tensor) -> Result<()>,
{
    let mut y = Tensor::zeros(shape, like.dtype(), like.device())?;
    f(&mut y)?;
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// Element-wise and reductions

pub fn unary(op: Unary, x: &Tensor) -> Result<Tensor> {
    check_compute("unary", x)?;
    with_out(x.shape().clone(), x, |y| x.device().backend().unary(op, x, y))
}

pub fn unary_bwd(op: Unary, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same("unary_bwd", &[x, dy])?;
    check_eq("unary_bwd", x, dy)?;
    with_out(x.shape().clone(), x, |dx| x.device().backend().unary_bwd(op, x, dy, dx))
}

pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = match op {
        Binary::Add => "add",
        Binary::Sub => "sub",
        Binary::Mul => "mul",
    };
    check_same(name, &[a, b])?;
    check_eq(name, a, b)?;
    with_out(a.shape().clone(), a, |y| a.device().backend().binary(op, a, b, y))
}

/// a + b, written into a's or b's storage when nobody else holds it (gradient accumulation).
/// IEEE addition commutes, so the result is the same whichever buffer receives it.
pub fn add_into(mut a: Tensor, mut b: Tensor) -> Result<Tensor> {
    check_same("add", &[&a, &b])?;
    check_eq("add", &a, &b)?;
    let backend = a.device().backend();
    if a.is_unique() {
        backend.add_assign(&mut a, &b)?;
        Ok(a)
    } else if b.is_unique() {
        backend.add_assign(&mut b, &a)?;
        Ok(b)
    } else {
        binary(Binary::Add, &a, &b)
    }
}

pub fn affine(x: &Tensor, alpha: f64, beta: f64) -> Result<Tensor> {
    check_compute("affine", x)?;
    with_out(x.shape().clone(), x, |y| x.device().backend().affine(x, alpha, beta, y))
}

pub fn scale_by(x: &Tensor, s: &Tensor, divide: bool) -> Result<Tensor> {
    check_same("scale_by", &[x, s])?;
    check_one("scale_by", s)?;
    with_out(x.shape().clone(), x, |y| x.device().backend().scale_by(x, s, divide, y))
}

pub fn reduce(op: Reduce, x: &Tensor) -> Result<Tensor> {
    check_compute("reduce", x)?;
    with_out(Shape::scalar(), x, |y| x.device().backend().reduce(op, x, y))
}

/// One reduction per tensor, [T]: what `reduce` gives for each, computed on the device in one go
/// (so that the gradient norms of every parameter come back to the host in one copy).
pub fn reduce_each(op: Reduce, xs: &[&Tensor]) -> Result<Tensor> {
    let first = *xs.first().ok_or_else(|| Error::invalid("reduce_each", "no tensors"))?;
    check_same("reduce_each", xs)?;
    with_out([xs.len()], first, |y| first.device().backend().reduce_each(op, xs, y))
}

pub fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same("dot", &[a, b])?;
    check_eq("dot", a, b)?;
    with_out(Shape::scalar(), a, |y| a.device().backend().dot(a, b, y))
}

/// A tensor shaped like `like` filled with the one value of `g` (the backward of a reduction).
pub fn broadcast_scalar(g: &Tensor, like: &Tensor) -> Result<Tensor> {
    check_same("broadcast_scalar", &[g, like])?;
    check_one("broadcast_scalar", g)?;
    with_out(like.shape().clone(), like, |y| like.device().backend().broadcast_scalar(g, like, y))
}

fn check_channel_vec(op: &'static str, x: &Tensor, l: &Tensor) -> Result<()> {
    if x.rank() < 2 {
        return Err(Error::bad_shape(op, x.shape(), "expected [B, C, ...]"));
    }
    if l.dims() != [x.dims()[1]] {
        return Err(Error::mismatch_because(op, x.shape(), l.shape(), "per-channel vector must be [C]"));
    }
    Ok(())
}

pub fn channel_scale(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    check_same("channel_scale", &[x, l])?;
    check_channel_vec("channel_scale", x, l)?;
    with_out(x.shape().clone(), x, |y| x.device().backend().channel_scale(x, l, y))
}

/// Per-channel sums over batch and space of a * b (or of a): the gradient of a per-channel vector.
pub fn channel_dot(a: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    check_compute("channel_dot", a)?;
    if a.rank() < 2 {
        return Err(Error::bad_shape("channel_dot", a.shape(), "expected [B, C, ...]"));
    }
    if let Some(b) = b {
        check_same("channel_dot", &[a, b])?;
        check_eq("channel_dot", a, b)?;
    }
    with_out([a.dims()[1]], a, |y| a.device().backend().channel_dot(a, b, y))
}

pub fn layerscale(x: &Tensor, branch: &Tensor, l: &Tensor) -> Result<Tensor> {
    check_same("layerscale", &[x, branch, l])?;
    check_eq("layerscale", x, branch)?;
    check_channel_vec("layerscale", x, l)?;
    with_out(x.shape().clone(), x, |y| x.device().backend().layerscale_fwd(x, branch, l, y))
}

/// The LayerScale residual's backward for the branch and the gains: (l[c] dy, sum_{b,s} dy branch).
pub fn layerscale_bwd(dy: &Tensor, branch: &Tensor, l: &Tensor) -> Result<(Tensor, Tensor)> {
    check_same("layerscale_bwd", &[dy, branch, l])?;
    check_eq("layerscale_bwd", dy, branch)?;
    check_channel_vec("layerscale_bwd", dy, l)?;
    let mut dbranch = Tensor::zeros(dy.shape().clone(), dy.dtype(), dy.device())?;
    let mut dl = Tensor::zeros(l.shape().clone(), l.dtype(), l.device())?;
    dy.device().backend().layerscale_bwd(dy, branch, l, &mut dbranch, &mut dl)?;
    Ok((dbranch, dl))
}

/// Concatenation of [B, C_i, S...] tensors along channels.
pub fn concat_channels(parts: &[&Tensor]) -> Result<Tensor> {
    let first = *parts.first().ok_or_else(|| Error::invalid("concat_channels", "nothing to concatenate"))?;
    check_same("concat_channels", parts)?;
    if first.rank() < 2 {
        return Err(Error::bad_shape("concat_channels", first.shape(), "expected [B, C, ...]"));
    }
    let mut c_total = 0;
    for p in parts {
        if p.rank() != first.rank() || p.dims()[0] != first.dims()[0] || p.dims()[2..] != first.dims()[2..] {
            return Err(Error::mismatch_because("concat_channels", first.shape(), p.shape(), "all but the channel dimension must agree"));
        }
        c_total += p.dims()[1];
    }
    let mut dims = first.dims().to_vec();
    dims[1] = c_total;
    with_out(dims, first, |y| {
        let mut off = 0;
        for p in parts {
            first.device().backend().copy_channels(p, y, off)?;
            off += p.dims()[1];
        }
        Ok(())
    })
}

pub fn slice_channels(x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
    check_compute("slice_channels", x)?;
    if x.rank() < 2 || offset + len > x.dims()[1] {
        return Err(Error::bad_shape("slice_channels", x.shape(), format!("channels {offset}..{} out of range", offset + len)));
    }
    let mut dims = x.dims().to_vec();
    dims[1] = len;
    with_out(dims, x, |y| x.device().backend().slice_channels(x, offset, y))
}

// ---------------------------------------------------------------------------------------------
// Convolutions

fn conv_out(op: &'static str, x: &Shape, k: usize, p: Conv2dParams, size: usize) -> Result<usize> {
    if p.stride == 0 {
        return Err(Error::invalid(op, "stride must be at least 1"));
    }
    let padded = size + 2 * p.padding;
    if k == 0 || padded < k {
        return Err(Error::bad_shape(op, x, format!("a {k}-wide kernel does not fit a map of {size} with padding {}", p.padding)));
    }
    Ok((padded - k) / p.stride + 1)
}

/// Output shape of conv2d, after checking x [B, C_in, H, W], w [C_out, C_in, kh, kw], b [C_out].
fn conv2d_shape(op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Shape> {
    check_rank(op, x, 4, "input")?;
    check_rank(op, w, 4, "weight")?;
    let (xd, wd) = (x.dims(), w.dims());
    if xd[1] != wd[1] {
        return Err(Error::mismatch_because(op, x.shape(), w.shape(), "input channels differ from the weight's C_in"));
    }
    if let Some(b) = b {
        if b.dims() != [wd[0]] {
            return Err(Error::mismatch_because(op, w.shape(), b.shape(), "bias must be [C_out]"));
        }
    }
    let ho = conv_out(op, x.shape(), wd[2], p, xd[2])?;
    let wo = conv_out(op, x.shape(), wd[3], p, xd[3])?;
    Ok(Shape::new([xd[0], wd[0], ho, wo]))
}

/// 2-D cross-correlation (PyTorch's conv2d) with zero padding and an optional bias.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let mut ts = vec![x, w];
    ts.extend(b);
    check_same("conv2d", &ts)?;
    let shape = conv2d_shape("conv2d", x, w, b, p)?;
    with_out(shape, x, |y| x.device().backend().conv2d_fwd(x, w, b, p, y))
}

/// The gradient of conv2d with respect to its input of shape `x_shape`.
pub fn conv2d_bwd_input(dy: &Tensor, w: &Tensor, x_shape: &Shape, p: Conv2dParams) -> Result<Tensor> {
    check_same("conv2d_bwd_input", &[dy, w])?;
    let xd = x_shape.dims();
    if xd.len() != 4 {
        return Err(Error::bad_shape("conv2d_bwd_input", x_shape, "input must have 4 dimensions"));
    }
    let wd = w.dims();
    let expect = [xd[0], wd[0], conv_out("conv2d_bwd_input", x_shape, wd[2], p, xd[2])?, conv_out("conv2d_bwd_input", x_shape, wd[3], p, xd[3])?];
    if dy.dims() != expect || wd[1] != xd[1] {
        return Err(Error::mismatch_because("conv2d_bwd_input", dy.shape(), &Shape::new(expect), "output gradient does not match the forward's output"));
    }
    with_out(x_shape.clone(), dy, |dx| dy.device().backend().conv2d_bwd_input(dy, w, p, dx))
}

/// The gradient of conv2d with respect to its weight of shape `w_shape`.
pub fn conv2d_bwd_weight(x: &Tensor, dy: &Tensor, w_shape: &Shape, p: Conv2dParams) -> Result<Tensor> {
    check_same("conv2d_bwd_weight", &[x, dy])?;
    let wd = w_shape.dims();
    if wd.len() != 4 || x.rank() != 4 || dy.rank() != 4 || wd[1] != x.dims()[1] || wd[0] != dy.dims()[1] {
        return Err(Error::mismatch_because(
            "conv2d_bwd_weight",
            x.shape(),
            dy.shape(),
            format!("input and output gradient do not fit a weight of shape {w_shape}"),
        ));
    }
    let op = "conv2d_bwd_weight";
    let (xd, dyd) = (x.dims(), dy.dims());
    let expect = [xd[0], wd[0], conv_out(op, x.shape(), wd[2], p, xd[2])?, conv_out(op, x.shape(), wd[3], p, xd[3])?];
    if dyd != expect {
        return Err(Error::mismatch_because(op, dy.shape(), &Shape::new(expect), "output gradient does not match the forward's output"));
    }
    with_out(w_shape.clone(), x, |dw| x.device().backend().conv2d_bwd_weight(x, dy, p, dw))
}

/// Transposed 2-D convolution (PyTorch's conv_transpose2d, output padding 0): x [B, C_in, H, W],
/// w [C_in, C_out, kh, kw], output [B, C_out, (H-1)s - 2p + kh, (W-1)s - 2p + kw]. It is the
/// adjoint of conv2d, so it runs on conv2d's backward kernels.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let op = "conv_transpose2d";
    let mut ts = vec![x, w];
    ts.extend(b);
    check_same(op, &ts)?;
    check_rank(op, x, 4, "input")?;
    check_rank(op, w, 4, "weight")?;
    let (xd, wd) = (x.dims(), w.dims());
    if xd[1] != wd[0] {
        return Err(Error::mismatch_because(op, x.shape(), w.shape(), "input channels differ from the weight's C_in"));
    }
    if let Some(b) = b {
        if b.dims() != [wd[1]] {
            return Err(Error::mismatch_because(op, w.shape(), b.shape(), "bias must be [C_out]"));
        }
    }
    if p.stride == 0 {
        return Err(Error::invalid(op, "stride must be at least 1"));
    }
    let out = |n: usize, k: usize| ((n - 1) * p.stride + k).checked_sub(2 * p.padding).filter(|&v| v > 0);
    let (ho, wo) = match (xd[2], xd[3]) {
        (h, w_) if h > 0 && w_ > 0 => match (out(h, wd[2]), out(w_, wd[3])) {
            (Some(ho), Some(wo)) => (ho, wo),
            _ => return Err(Error::bad_shape(op, x.shape(), "padding leaves no output")),
        },
        _ => return Err(Error::bad_shape(op, x.shape(), "empty input map")),
    };
    let y_shape = Shape::new([xd[0], wd[1], ho, wo]);
    with_out(y_shape, x, |y| {
        let be = x.device().backend();
        be.conv2d_bwd_input(x, w, p, y)?;
        match b {
            Some(b) => be.add_channel_bias(y, b),
            None => Ok(()),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Spectral

fn half_spectrum_shape(x: &Shape) -> Shape {
    let mut d = x.dims().to_vec();
    let w = d.pop().unwrap_or(0);
    d.push(w / 2 + 1);
    d.push(2);
    Shape::new(d)
}

fn check_spatial(op: &'static str, x: &Tensor) -> Result<()> {
    if x.rank() < 2 || x.dims()[x.rank() - 1] == 0 || x.dims()[x.rank() - 2] == 0 {
        return Err(Error::bad_shape(op, x.shape(), "expected [..., H, W] with H, W >= 1"));
    }
    Ok(())
}

/// Real image [.., H, W] -> half spectrum [.., H, W/2+1, 2], unnormalised.
pub fn rfft2(x: &Tensor) -> Result<Tensor> {
    check_compute("rfft2", x)?;
    check_spatial("rfft2", x)?;
    with_out(half_spectrum_shape(x.shape()), x, |y| x.device().backend().rfft2(x, y))
}

/// Image shape [.., H, w] behind a half spectrum [.., H, w/2+1, 2].
fn image_shape(op: &'static str, z: &Tensor, w: usize) -> Result<Shape> {
    check_complex(op, z, 3)?;
    let d = z.dims();
    let wh = d[d.len() - 2];
    if w == 0 || wh != w / 2 + 1 {
        return Err(Error::bad_shape(op, z.shape(), format!("half spectrum of width {wh} cannot give width {w}")));
    }
    let mut out = d[..d.len() - 2].to_vec();
    out.push(w);
    Ok(Shape::new(out))
}

/// Half spectrum [.., H, w/2+1, 2] -> real image [.., H, w], scaled by 1/(H w).
pub fn irfft2(z: &Tensor, w: usize) -> Result<Tensor> {
    check_compute("irfft2", z)?;
    let shape = image_shape("irfft2", z, w)?;
    with_out(shape, z, |y| z.device().backend().irfft2(z, y))
}

pub fn rfft2_bwd(dy: &Tensor, w: usize) -> Result<Tensor> {
    check_compute("rfft2_bwd", dy)?;
    let shape = image_shape("rfft2_bwd", dy, w)?;
    with_out(shape, dy, |dx| dy.device().backend().rfft2_bwd(dy, dx))
}

pub fn irfft2_bwd(dy: &Tensor) -> Result<Tensor> {
    check_compute("irfft2_bwd", dy)?;
    check_spatial("irfft2_bwd", dy)?;
    with_out(half_spectrum_shape(dy.shape()), dy, |dz| dy.device().backend().irfft2_bwd(dy, dz))
}

/// Checks a half spectrum [B, C_in, H, Wh, 2] against a weight [C_in, C_out, R, My, 2] and
/// returns the kept rows.
fn spectral_rows(op: &'static str, xh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<Vec<usize>> {
    check_rank(op, xh, 5, "half spectrum")?;
    check_rank(op, w, 5, "spectral weight")?;
    check_complex(op, xh, 5)?;
    check_complex(op, w, 5)?;
    let (xd, wd) = (xh.dims(), w.dims());
    let rows = modes.kept_rows(xd[2]);
    let my = modes.modes.min(xd[3]);
    if wd[0] != xd[1] || wd[2] != rows.len() || wd[3] != my {
        return Err(Error::mismatch_because(
            op,
            xh.shape(),
            w.shape(),
            format!("weight must be [C_in={}, C_out, kept rows={}, kept cols={}, 2] for {} modes ({:?})", xd[1], rows.len(), my, modes.modes, modes.convention),
        ));
    }
    Ok(rows)
}

/// Y[b, o, r, c] = sum_i X[b, i, r, c] W[i, o, r, c] on the kept modes, zero elsewhere.
pub fn spectral_mix(xh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<Tensor> {
    check_same("spectral_mix", &[xh, w])?;
    let rows = spectral_rows("spectral_mix", xh, w, modes)?;
    let d = xh.dims();
    let shape = Shape::new([d[0], w.dims()[1], d[2], d[3], 2]);
    with_out(shape, xh, |y| xh.device().backend().spectral_mix_fwd(xh, w, &rows, y))
}

/// dX = dY conj(W) summed over output channels, on the kept modes.
pub fn spectral_mix_bwd_input(dyh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<Tensor> {
    check_same("spectral_mix_bwd_input", &[dyh, w])?;
    check_rank("spectral_mix_bwd_input", dyh, 5, "output gradient")?;
    check_rank("spectral_mix_bwd_input", w, 5, "spectral weight")?;
    let d = dyh.dims();
    let shape = Shape::new([d[0], w.dims()[0], d[2], d[3], 2]);
    let rows = modes.kept_rows(d[2]);
    if w.dims()[1] != d[1] || w.dims()[2] != rows.len() || w.dims()[3] != modes.modes.min(d[3]) {
        return Err(Error::mismatch_because("spectral_mix_bwd_input", dyh.shape(), w.shape(), "output gradient does not fit the weight"));
    }
    with_out(shape, dyh, |dx| dyh.device().backend().spectral_mix_bwd_input(dyh, w, &rows, dx))
}

/// dW = conj(X) dY summed over the batch, on the kept modes.
pub fn spectral_mix_bwd_weight(xh: &Tensor, dyh: &Tensor, w_shape: &Shape, modes: SpectralModes) -> Result<Tensor> {
    check_same("spectral_mix_bwd_weight", &[xh, dyh])?;
    let wd = w_shape.dims();
    let rows = modes.kept_rows(xh.dims().get(2).copied().unwrap_or(0));
    if xh.rank() != 5
        || dyh.rank() != 5
        || wd.len() != 5
        || wd[0] != xh.dims()[1]
        || wd[1] != dyh.dims()[1]
        || wd[2] != rows.len()
        || xh.dims()[0] != dyh.dims()[0]
        || xh.dims()[2..] != dyh.dims()[2..]
    {
        return Err(Error::mismatch_because("spectral_mix_bwd_weight", xh.shape(), dyh.shape(), format!("spectra do not fit a weight of shape {w_shape}")));
    }
    with_out(w_shape.clone(), xh, |dw| xh.device().backend().spectral_mix_bwd_weight(xh, dyh, &rows, dw))
}

// ---------------------------------------------------------------------------------------------
// Normalisation

/// Output, mean and reciprocal standard deviation of a normalisation of x [B, C, ...].
pub struct NormOut {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

fn norm_stat_shape(kind: NormKind, x: &Tensor) -> Shape {
    let (b, c, s) = bcs(x);
    if kind.over_channels() {
        Shape::new([b, s])
    } else {
        Shape::new([b, c])
    }
}

fn check_norm_inputs(op: &'static str, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> Result<()> {
    if x.rank() < 2 {
        return Err(Error::bad_shape(op, x.shape(), "expected [B, C, ...]"));
    }
    for p in gamma.iter().chain(beta.iter()) {
        check_same(op, &[x, p])?;
        check_channel_vec(op, x, p)?;
    }
    Ok(())
}

pub fn norm(kind: NormKind, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<NormOut> {
    check_compute("norm", x)?;
    check_norm_inputs("norm", x, gamma, beta)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid("norm", format!("eps must be finite and >= 0, got {eps}")));
    }
    let mut y = Tensor::zeros(x.shape().clone(), x.dtype(), x.device())?;
    let mut mean = Tensor::zeros(norm_stat_shape(kind, x), x.dtype(), x.device())?;
    let mut rstd = Tensor::zeros(norm_stat_shape(kind, x), x.dtype(), x.device())?;
    x.device().backend().norm_fwd(kind, x, gamma, beta, eps, &mut y, &mut mean, &mut rstd)?;
    Ok(NormOut { y, mean, rstd })
}

/// Gradients of a normalisation: (dx, dgamma, dbeta), the last two when asked for.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn norm_bwd(
    kind: NormKind,
    x: &Tensor,
    dy: &Tensor,
    gamma: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_dgamma: bool,
    want_dbeta: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    check_same("norm_bwd", &[x, dy, mean, rstd])?;
    check_eq("norm_bwd", x, dy)?;
    check_norm_inputs("norm_bwd", x, gamma, None)?;
    let stat = norm_stat_shape(kind, x);
    if mean.shape() != &stat || rstd.shape() != &stat {
        return Err(Error::mismatch_because("norm_bwd", mean.shape(), &stat, "statistics do not fit the input"));
    }
    let c = x.dims()[1];
    let mut dx = Tensor::zeros(x.shape().clone(), x.dtype(), x.device())?;
    let mut dgamma = want_dgamma.then(|| Tensor::zeros([c], x.dtype(), x.device())).transpose()?;
    let mut dbeta = want_dbeta.then(|| Tensor::zeros([c], x.dtype(), x.device())).transpose()?;
    x.device().backend().norm_bwd(kind, x, dy, gamma, mean, rstd, &mut dx, dgamma.as_mut(), dbeta.as_mut())?;
    Ok((dx, dgamma, dbeta))
}

// ---------------------------------------------------------------------------------------------
// Complex fields (the physics forward model)

pub fn complex_mul(z: &Tensor, p: &Tensor, conj: bool) -> Result<Tensor> {
    check_same("complex_mul", &[z, p])?;
    check_complex("complex_mul", z, 3)?;
    check_rank("complex_mul", p, 3, "probe")?;
    let zd = z.dims();
    if p.dims() != &zd[zd.len() - 3..] {
        return Err(Error::mismatch_because("complex_mul", z.shape(), p.shape(), "probe must be [H, W, 2] matching the field's last dimensions"));
    }
    with_out(z.shape().clone(), z, |y| z.device().backend().complex_mul(z, p, conj, y))
}

pub fn fft2(z: &Tensor, inverse: bool, scale: f64) -> Result<Tensor> {
    check_compute("fft2", z)?;
    check_complex("fft2", z, 3)?;
    with_out(z.shape().clone(), z, |y| z.device().backend().fft2(z, inverse, scale, y))
}

pub fn roll2d(x: &Tensor, sh: usize, sw: usize, complex: bool) -> Result<Tensor> {
    check_compute("roll2d", x)?;
    if complex {
        check_complex("roll2d", x, 3)?;
    } else {
        check_spatial("roll2d", x)?;
    }
    with_out(x.shape().clone(), x, |y| x.device().backend().roll2d(x, sh, sw, complex, y))
}

pub fn complex_abs(z: &Tensor) -> Result<Tensor> {
    check_compute("complex_abs", z)?;
    check_complex("complex_abs", z, 1)?;
    let d = z.dims();
    with_out(&d[..d.len() - 1], z, |y| z.device().backend().complex_abs(z, y))
}

pub fn complex_abs_bwd(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same("complex_abs_bwd", &[z, dy])?;
    check_complex("complex_abs_bwd", z, 1)?;
    if dy.dims() != &z.dims()[..z.rank() - 1] {
        return Err(Error::mismatch("complex_abs_bwd", z.shape(), dy.shape()));
    }
    with_out(z.shape().clone(), z, |dz| z.device().backend().complex_abs_bwd(z, dy, dz))
}

pub fn complex_angle(z: &Tensor) -> Result<Tensor> {
    check_compute("complex_angle", z)?;
    check_complex("complex_angle", z, 1)?;
    let d = z.dims();
    with_out(&d[..d.len() - 1], z, |y| z.device().backend().complex_angle(z, y))
}

pub fn complex_angle_bwd(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same("complex_angle_bwd", &[z, dy])?;
    check_complex("complex_angle_bwd", z, 1)?;
    if dy.dims() != &z.dims()[..z.rank() - 1] {
        return Err(Error::mismatch("complex_angle_bwd", z.shape(), dy.shape()));
    }
    with_out(z.shape().clone(), z, |dz| z.device().backend().complex_angle_bwd(z, dy, dz))
}

/// [B, 2C, ...] channels (real parts then imaginary parts) -> complex [B, C, ..., 2].
pub fn channels_to_complex(x: &Tensor) -> Result<Tensor> {
    check_compute("channels_to_complex", x)?;
    if x.rank() < 2 || x.dims()[1] % 2 != 0 {
        return Err(Error::bad_shape("channels_to_complex", x.shape(), "expected [B, 2C, ...] with an even channel count"));
    }
    let mut d = x.dims().to_vec();
    d[1] /= 2;
    d.push(2);
    with_out(d, x, |y| x.device().backend().pack_complex(x, false, y))
}

/// Complex [B, C, ..., 2] -> [B, 2C, ...] channels (real parts then imaginary parts).
pub fn complex_to_channels(z: &Tensor) -> Result<Tensor> {
    check_compute("complex_to_channels", z)?;
    check_complex("complex_to_channels", z, 3)?;
    let mut d = z.dims()[..z.rank() - 1].to_vec();
    d[1] *= 2;
    with_out(d, z, |y| z.device().backend().pack_complex(z, true, y))
}

// ---------------------------------------------------------------------------------------------
// Optimiser updates and gradient clipping (in place)

/// Makes `t`'s storage its own (copying it if shared), so that it can be written in place.
fn own(t: &mut Tensor) -> Result<()> {
    if !t.is_unique() {
        let mut copy = Tensor::zeros(t.shape().clone(), t.dtype(), t.device())?;
        t.device().backend().affine(t, 1.0, 0.0, &mut copy)?;
        *t = copy;
    }
    Ok(())
}

pub fn adam_step(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
    check_same("adam_step", &[p, g, m, v])?;
    for t in [g, &*m, &*v] {
        check_eq("adam_step", p, t)?;
    }
    own(p)?;
    own(m)?;
    own(v)?;
    p.device().backend().adam_step(p, g, m, v, h)
}

pub fn sgd_step(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
    check_same("sgd_step", &[p, g])?;
    check_eq("sgd_step", p, g)?;
    own(p)?;
    let buf = match buf {
        Some(b) => {
            check_eq("sgd_step", p, b)?;
            own(b)?;
            Some(b)
        }
        None => None,
    };
    p.device().backend().sgd_step(p, g, buf, h)
}

/// Adaptive gradient clipping of `g` in place against its weight `w` (same shape): unit-wise
/// along `axis` (the output units), or per tensor when `axis` is None.
pub fn agc(w: &Tensor, g: &mut Tensor, axis: Option<usize>, lambda: f64, eps: f64) -> Result<()> {
    check_same("agc", &[w, g])?;
    check_eq("agc", w, g)?;
    let d = g.dims();
    let units = match axis {
        None => (1, 1, g.numel()),
        Some(a) if a < d.len() => (d[..a].iter().product(), d[a], d[a + 1..].iter().product()),
        Some(a) => return Err(Error::bad_shape("agc", g.shape(), format!("no axis {a}"))),
    };
    if !(lambda > 0.0 && lambda.is_finite() && eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid("agc", format!("lambda must be finite and > 0 and eps finite and >= 0, got {lambda} and {eps}")));
    }
    own(g)?;
    g.device().backend().agc(w, g, units, lambda, eps)
}

/// In place: clamps every element to [-c, c].
pub fn clamp(x: &mut Tensor, c: f64) -> Result<()> {
    check_compute("clamp", x)?;
    own(x)?;
    x.device().backend().clamp(x, c)
}
