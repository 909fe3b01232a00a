//! Reductions on the CPU: f64 sums of fixed pieces, added in order.

use super::Reduce;
use crate::backend::cpu::{sum_pairs, with_float};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

/// out = sum x or sum x^2.
pub(super) fn reduce(op: Reduce, x: &Tensor, y: &mut Tensor) -> Result<()> {
    reduce_each(op, &[x], y)
}

pub(super) fn reduce_each(op: Reduce, xs: &[&Tensor], y: &mut Tensor) -> Result<()> {
    with_float!(y.dtype(), "reduce", |T| {
        let ys = y.as_mut_slice::<T>()?;
        for (out, x) in ys.iter_mut().zip(xs) {
            let v = x.as_slice::<T>()?;
            let total = match op {
                Reduce::Sum => sum_pairs(v, v, |a, _| a),
                Reduce::SumSq => sum_pairs(v, v, |a, _| a * a),
            };
            *out = T::of_f64(total);
        }
        Ok(())
    })
}

pub(super) fn dot(a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    with_float!(a.dtype(), "dot", |T| {
        let total = sum_pairs(a.as_slice::<T>()?, b.as_slice::<T>()?, |a, b| a * b);
        y.as_mut_slice::<T>()?[0] = T::of_f64(total);
        Ok(())
    })
}
