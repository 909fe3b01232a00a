//! Full reductions (kernels/reduce.cu): sums, sums of squares and dot products, deterministic on
//! every device; and the sums of squares of many tensors at once, read back in one copy (the
//! gradient norms of every parameter).

mod cpu;
mod cuda;

use super::{check_compute, check_eq, check_same, compute};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    SumSq,
}

/// sum x or sum x^2, as a one-element tensor on x's device.
pub fn reduce(op: Reduce, x: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("reduce");
    check_compute("reduce", x)?;
    compute(Shape::scalar(), x, |y| cpu::reduce(op, x, y), |gpu, y| cuda::reduce(gpu, op, x, y))
}

/// One reduction per tensor, [T]: what `reduce` gives for each, computed on the device in one go
/// (so that the gradient norms of every parameter come back to the host in one copy).
pub fn reduce_each(op: Reduce, xs: &[&Tensor]) -> Result<Tensor> {
    let _p = super::profile::scope("reduce_each");
    let first = *xs.first().ok_or_else(|| Error::invalid("reduce_each", "no tensors"))?;
    check_same("reduce_each", xs)?;
    compute([xs.len()], first, |y| cpu::reduce_each(op, xs, y), |gpu, y| cuda::reduce_each(gpu, op, xs, y))
}

/// sum a * b.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("dot");
    check_same("dot", &[a, b])?;
    check_eq("dot", a, b)?;
    compute(Shape::scalar(), a, |y| cpu::dot(a, b, y), |gpu, y| cuda::dot(gpu, a, b, y))
}
