//! The element-wise kernels on the CPU: f64 arithmetic for every unary function (but GELU on f32,
//! which has its own vectorised f32 form), T arithmetic for the rest, in parallel pieces.

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{gelu_f32, Binary, Unary};
use crate::backend::cpu::{map1, map2, scalar, with_float, CHUNK};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::{DType, Tensor};

/// Phi(x), the normal CDF, through erfc: it keeps its relative accuracy in the negative tail,
/// where 1 + erf(x / sqrt 2) would cancel.
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn unary_f(op: Unary, x: f64) -> f64 {
    match op {
        Unary::Gelu => x * normal_cdf(x),
        Unary::Abs => x.abs(),
        Unary::Sqrt => x.sqrt(),
        Unary::Square => x * x,
        Unary::Log => x.ln(),
        Unary::WrapAngle => x - std::f64::consts::TAU * (x / std::f64::consts::TAU).round(),
        Unary::RoundF16 => half::f16::from_f64(x).to_f64(),
        Unary::RoundBf16 => half::bf16::from_f64(x).to_f64(),
    }
}

fn unary_df(op: Unary, x: f64) -> f64 {
    match op {
        // d/dx x Phi(x) = Phi(x) + x phi(x)
        Unary::Gelu => normal_cdf(x) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp(),
        Unary::Abs => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        Unary::Sqrt => 0.5 / x.sqrt(),
        Unary::Square => 2.0 * x,
        Unary::Log => 1.0 / x,
        // Rounding is treated as the identity by the chain rule (a straight-through cast);
        // `ops::round_to` rounds the gradient itself.
        Unary::WrapAngle | Unary::RoundF16 | Unary::RoundBf16 => 1.0,
    }
}

pub(super) fn unary(op: Unary, x: &Tensor, y: &mut Tensor) -> Result<()> {
    if op == Unary::Gelu && x.dtype() == DType::F32 {
        gelu_f32::forward(x.as_slice::<f32>()?, y.as_mut_slice::<f32>()?);
        return Ok(());
    }
    with_float!(x.dtype(), "unary", |T| {
        map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| T::of_f64(unary_f(op, v.as_f64())));
        Ok(())
    })
}

pub(super) fn unary_bwd(op: Unary, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    if op == Unary::Gelu && x.dtype() == DType::F32 {
        gelu_f32::backward(x.as_slice::<f32>()?, dy.as_slice::<f32>()?, dx.as_mut_slice::<f32>()?);
        return Ok(());
    }
    with_float!(x.dtype(), "unary_bwd", |T| {
        map2(x.as_slice::<T>()?, dy.as_slice::<T>()?, dx.as_mut_slice::<T>()?, |x, g| T::of_f64(g.as_f64() * unary_df(op, x.as_f64())));
        Ok(())
    })
}

pub(super) fn binary(op: Binary, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    with_float!(a.dtype(), "binary", |T| {
        let (a, b, y) = (a.as_slice::<T>()?, b.as_slice::<T>()?, y.as_mut_slice::<T>()?);
        match op {
            Binary::Add => map2(a, b, y, |a, b| a + b),
            Binary::Sub => map2(a, b, y, |a, b| a - b),
            Binary::Mul => map2(a, b, y, |a, b| a * b),
        }
        Ok(())
    })
}

pub(crate) fn add_assign(acc: &mut Tensor, other: &Tensor) -> Result<()> {
    with_float!(acc.dtype(), "add_assign", |T| {
        let o = other.as_slice::<T>()?;
        acc.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(o.par_chunks(CHUNK)).for_each(|(ac, oc)| ac.iter_mut().zip(oc).for_each(|(a, &o)| *a += o));
        Ok(())
    })
}

pub(super) fn affine(x: &Tensor, alpha: f64, beta: f64, y: &mut Tensor) -> Result<()> {
    with_float!(x.dtype(), "affine", |T| {
        let (a, b) = (T::of_f64(alpha), T::of_f64(beta));
        map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| a * v + b);
        Ok(())
    })
}

pub(super) fn scale_by(x: &Tensor, s: &Tensor, divide: bool, y: &mut Tensor) -> Result<()> {
    with_float!(x.dtype(), "scale_by", |T| {
        let s = scalar::<T>(s)?;
        if divide {
            map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| v / s);
        } else {
            map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| v * s);
        }
        Ok(())
    })
}

pub(super) fn fill(g: &Tensor, y: &mut Tensor) -> Result<()> {
    with_float!(g.dtype(), "broadcast_scalar", |T| {
        let g = scalar::<T>(g)?;
        y.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).for_each(|c| c.fill(g));
        Ok(())
    })
}

pub(super) fn scale_in_place(x: &mut Tensor, k: f64) -> Result<()> {
    with_float!(x.dtype(), "scale_in_place", |T| {
        let k = T::of_f64(k);
        x.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).for_each(|ch| ch.iter_mut().for_each(|v| *v *= k));
        Ok(())
    })
}

pub(super) fn clamp(x: &mut Tensor, c: f64) -> Result<()> {
    with_float!(x.dtype(), "clamp", |T| {
        let c = T::of_f64(c);
        x.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).for_each(|ch| ch.iter_mut().for_each(|v| *v = v.max(-c).min(c)));
        Ok(())
    })
}
