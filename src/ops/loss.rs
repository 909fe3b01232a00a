//! Reductions and losses. Every loss returns a one-element value.

use super::elementwise::{abs, add, add_scalar, div_scalar, scale, sqrt, square, sub};
use crate::autograd::{Tape, Var};
use crate::backend::{self, Reduce};
use crate::error::{Error, Result};

fn reduce_op(tape: &mut Tape, x: &Var, op: Reduce) -> Result<Var> {
    let y = backend::reduce(op, x.value())?;
    let saved = x.value().clone();
    let keep = tape.requires_grad(x);
    let saved = keep.then_some(saved);
    tape.record1(&[x], y, move |ctx| {
        let Some(x) = saved else { return Ok(()) };
        let g = backend::broadcast_scalar(ctx.grad(0), &x)?;
        let dx = match op {
            Reduce::Sum => g,
            // d/dx sum x^2 = 2 x g
            Reduce::SumSq => backend::affine(&backend::binary(backend::Binary::Mul, &g, &x)?, 2.0, 0.0)?,
        };
        ctx.add(0, dx)
    })
}

/// Sum of all elements.
pub fn sum(tape: &mut Tape, x: &Var) -> Result<Var> {
    reduce_op(tape, x, Reduce::Sum)
}

/// Sum of squares of all elements.
pub fn sum_sq(tape: &mut Tape, x: &Var) -> Result<Var> {
    reduce_op(tape, x, Reduce::SumSq)
}

/// Mean of all elements.
pub fn mean(tape: &mut Tape, x: &Var) -> Result<Var> {
    let n = x.value().numel();
    if n == 0 {
        return Err(Error::bad_shape("mean", x.shape(), "mean of no elements"));
    }
    let s = sum(tape, x)?;
    scale(tape, &s, 1.0 / n as f64)
}

/// sqrt(sum over tensors of sum of squares).
pub fn global_norm(tape: &mut Tape, xs: &[&Var]) -> Result<Var> {
    let mut total: Option<Var> = None;
    for x in xs {
        let s = sum_sq(tape, x)?;
        total = Some(match total {
            None => s,
            Some(t) => add(tape, &t, &s)?,
        });
    }
    let total = total.ok_or_else(|| Error::invalid("global_norm", "no tensors given"))?;
    sqrt(tape, &total)
}

/// mean |pred - target|.
pub fn mae(tape: &mut Tape, pred: &Var, target: &Var) -> Result<Var> {
    let d = sub(tape, pred, target)?;
    let a = abs(tape, &d)?;
    mean(tape, &a)
}

/// mean (pred - target)^2.
pub fn mse(tape: &mut Tape, pred: &Var, target: &Var) -> Result<Var> {
    let d = sub(tape, pred, target)?;
    let s = square(tape, &d)?;
    mean(tape, &s)
}

/// ||pred - target||_2 / ||target||_2 over all elements.
pub fn rel_l2(tape: &mut Tape, pred: &Var, target: &Var) -> Result<Var> {
    let d = sub(tape, pred, target)?;
    let num = sum_sq(tape, &d)?;
    let num = sqrt(tape, &num)?;
    let den = sum_sq(tape, target)?;
    let den = sqrt(tape, &den)?;
    div_scalar(tape, &num, &den)
}

/// mean |pred - obs| / (mean(obs) + eps), the denominator detached: the reference system's
/// normalised amplitude loss.
pub fn mae_over_detached_mean(tape: &mut Tape, pred: &Var, obs: &Var, eps: f64) -> Result<Var> {
    let num = mae(tape, pred, obs)?;
    let m = mean(tape, obs)?;
    let m = tape.detach(&m);
    let den = add_scalar(tape, &m, eps)?;
    div_scalar(tape, &num, &den)
}
