//! Reductions on the CPU: f64 sums of fixed pieces, added in order.

use super::Reduce;
use crate::backend::cpu::{sum_pairs, sum_piece, with_float, CHUNK};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// out = sum x or sum x^2.
pub(super) fn reduce(op: Reduce, x: &Tensor, y: &mut Tensor) -> Result<()> {
    reduce_each(op, &[x], y)
}

/// One pass over all the tensors: every tensor's pieces (of `CHUNK` values, as [`sum_pairs`]
/// cuts them) are summed in parallel together, then each tensor's in order, so that ninety
/// small parameter tensors cost one parallel pass, not ninety, and give [`sum_pairs`]'s values.
pub(super) fn reduce_each(op: Reduce, xs: &[&Tensor], y: &mut Tensor) -> Result<()> {
    with_float!(y.dtype(), "reduce", |T| {
        let ys = y.as_mut_slice::<T>()?;
        let mut pieces: Vec<(usize, &[T])> = Vec::new();
        for (i, x) in xs.iter().enumerate() {
            pieces.extend(x.as_slice::<T>()?.chunks(CHUNK).map(|c| (i, c)));
        }
        let sums: Vec<f64> = pieces
            .par_iter()
            .map(|&(_, c)| match op {
                Reduce::Sum => sum_piece(c, c, &|a, _| a),
                Reduce::SumSq => sum_piece(c, c, &|a, _| a * a),
            })
            .collect();
        let mut totals = vec![0.0f64; xs.len()];
        for (&(i, _), s) in pieces.iter().zip(&sums) {
            totals[i] += s;
        }
        for (out, total) in ys.iter_mut().zip(totals) {
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
