//! Element-wise maps (kernels/elementwise.cu): every unary function with its derivative, binary
//! arithmetic, in-place accumulation, affine maps, scaling by a one-element tensor, broadcasting a
//! scalar, clamping. Their geometry is the operands' common shape ([`Map`]).

pub(crate) mod cpu;
pub(crate) mod cuda;
mod gelu_f32;

use super::{check_compute, check_eq, check_one, check_same, compute, on_device, own};
use crate::error::Result;
use crate::tensor::{Shape, Tensor};

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

impl Unary {
    /// The kernels' code of the op (the order of `unary_value` in elementwise.cu).
    pub(crate) fn code(self) -> i32 {
        self as i32
    }
    /// The op's name in a profile.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Unary::Gelu => "gelu",
            Unary::Abs => "abs",
            Unary::Sqrt => "sqrt",
            Unary::Square => "square",
            Unary::Log => "log",
            Unary::WrapAngle => "wrap_angle",
            Unary::RoundF16 => "round_f16",
            Unary::RoundBf16 => "round_bf16",
        }
    }
    /// The name of its derivative's op in a profile.
    pub(crate) fn bwd_name(self) -> &'static str {
        match self {
            Unary::Gelu => "gelu_bwd",
            Unary::Abs => "abs_bwd",
            Unary::Sqrt => "sqrt_bwd",
            Unary::Square => "square_bwd",
            Unary::Log => "log_bwd",
            Unary::WrapAngle => "wrap_angle_bwd",
            Unary::RoundF16 => "round_f16_bwd",
            Unary::RoundBf16 => "round_bf16_bwd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
        }
    }
}

/// The geometry of an element-wise op: operands on one device, of one compute dtype and one
/// shape, the output's.
pub(crate) struct Map {
    pub shape: Shape,
}

impl Map {
    pub(crate) fn of(op: &'static str, ts: &[&Tensor]) -> Result<Map> {
        check_same(op, ts)?;
        for t in &ts[1..] {
            check_eq(op, ts[0], t)?;
        }
        Ok(Map { shape: ts[0].shape().clone() })
    }
}

pub fn unary(op: Unary, x: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope(op.name());
    let m = Map::of("unary", &[x])?;
    compute(m.shape, x, |y| cpu::unary(op, x, y), |gpu, y| cuda::unary(gpu, op, x, y))
}

pub fn unary_bwd(op: Unary, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope(op.bwd_name());
    let m = Map::of("unary_bwd", &[x, dy])?;
    compute(m.shape, x, |dx| cpu::unary_bwd(op, x, dy, dx), |gpu, dx| cuda::unary_bwd(gpu, op, x, dy, dx))
}

pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope(op.name());
    let m = Map::of(op.name(), &[a, b])?;
    compute(m.shape, a, |y| cpu::binary(op, a, b, y), |gpu, y| cuda::binary(gpu, op, a, b, y, None))
}

/// (a + b, GELU(a + b)): a residual branch's sum, which GELU's backward keeps, and its
/// activation. On a GPU one launch writes both; elsewhere the two ops run in turn. The values, and
/// the order in which the two outputs are allocated, are those of `binary(Add)` then
/// `unary(Gelu)`.
pub fn add_gelu(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    if !matches!(a.device().kind(), crate::device::DeviceKind::Cuda(_)) {
        let sum = binary(Binary::Add, a, b)?;
        let y = unary(Unary::Gelu, &sum)?;
        return Ok((sum, y));
    }
    let _p = super::profile::scope("add_gelu");
    let m = Map::of("add", &[a, b])?;
    let mut sum = Tensor::uninit(m.shape.clone(), a.dtype(), a.device())?;
    let mut y = Tensor::uninit(m.shape, a.dtype(), a.device())?;
    cuda::binary(a.device().gpu()?, Binary::Add, a, b, &mut sum, Some(&mut y))?;
    Ok((sum, y))
}

/// a + b, written into a's or b's storage when nobody else holds it (gradient accumulation).
/// IEEE addition commutes, so the result is the same whichever buffer receives it.
pub fn add_into(mut a: Tensor, mut b: Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("add_into");
    Map::of("add", &[&a, &b])?;
    let (acc, other) = if a.is_unique() {
        (&mut a, &b)
    } else if b.is_unique() {
        (&mut b, &a)
    } else {
        return binary(Binary::Add, &a, &b);
    };
    let dev = acc.device().clone();
    on_device(&dev, acc, |acc| cpu::add_assign(acc, other), |gpu, acc| cuda::add_assign(gpu, acc, other))?;
    Ok(if a.is_unique() { a } else { b })
}

/// y = alpha x + beta.
pub fn affine(x: &Tensor, alpha: f64, beta: f64) -> Result<Tensor> {
    let _p = super::profile::scope("affine");
    check_compute("affine", x)?;
    compute(x.shape().clone(), x, |y| cpu::affine(x, alpha, beta, y), |gpu, y| cuda::affine(gpu, x, alpha, beta, y))
}

/// y = x * s, or x / s when `divide`; s has one element (it stays on the device).
pub fn scale_by(x: &Tensor, s: &Tensor, divide: bool) -> Result<Tensor> {
    let _p = super::profile::scope("scale_by");
    check_same("scale_by", &[x, s])?;
    check_one("scale_by", s)?;
    compute(x.shape().clone(), x, |y| cpu::scale_by(x, s, divide, y), |gpu, y| cuda::scale_by(gpu, x, s, divide, y))
}

/// A tensor shaped like `like` filled with the one value of `g` (the backward of a reduction).
pub fn broadcast_scalar(g: &Tensor, like: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("broadcast_scalar");
    check_same("broadcast_scalar", &[g, like])?;
    check_one("broadcast_scalar", g)?;
    compute(like.shape().clone(), like, |y| cpu::fill(g, y), |gpu, y| cuda::fill(gpu, g, y))
}

/// In place: x *= k (clipping and unscaling gradients without a second buffer).
pub fn scale_in_place(x: &mut Tensor, k: f64) -> Result<()> {
    let _p = super::profile::scope("scale_in_place");
    check_compute("scale_in_place", x)?;
    own(x)?;
    let dev = x.device().clone();
    on_device(&dev, x, |x| cpu::scale_in_place(x, k), |gpu, x| cuda::scale_in_place(gpu, x.cuda_mut()?, k as f32))
}

/// In place: clamps every element to [-c, c].
pub fn clamp(x: &mut Tensor, c: f64) -> Result<()> {
    let _p = super::profile::scope("clamp");
    check_compute("clamp", x)?;
    own(x)?;
    let dev = x.device().clone();
    on_device(&dev, x, |x| cpu::clamp(x, c), |gpu, x| cuda::clamp(gpu, x, c))
}
