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

/// Per-sample sums of squares: x [B, ...] -> [B] (one fused per-channel reduction of the [1, B, ...]
/// view; its backward 2 x g[b] is one per-channel scale).
pub fn sample_sum_sq(tape: &mut Tape, x: &Var) -> Result<Var> {
    let d = x.dims();
    if d.is_empty() || d[0] == 0 {
        return Err(Error::bad_shape("sample_sum_sq", x.shape(), "expected [B, ...] with B >= 1"));
    }
    let xr = flat_samples(x)?;
    let y = backend::channel_dot(&xr, Some(&xr))?;
    let saved = tape.requires_grad(x).then_some(xr);
    let shape = x.shape().clone();
    tape.record1(&[x], y, move |ctx| {
        let Some(xr) = saved else { return Ok(()) };
        let dx = backend::affine(&backend::channel_scale(&xr, ctx.grad(0))?, 2.0, 0.0)?;
        ctx.add(0, dx.reshape(shape)?)
    })
}

/// 1 / v per entry of a constant per-sample vector (a zero entry gives 1: that sample's error
/// counts absolutely), on v's device.
fn reciprocal_const(v: &crate::tensor::Tensor) -> Result<crate::tensor::Tensor> {
    let inv: Vec<f64> = v.to_f64_vec()?.iter().map(|&x| if x > 0.0 { 1.0 / x } else { 1.0 }).collect();
    crate::tensor::Tensor::from_f64_vec(inv, v.shape().clone(), v.dtype(), v.device())
}

/// mean over samples of sqrt(num_b / den_b), den a constant.
fn mean_sqrt_ratio(tape: &mut Tape, num: &Var, den: &crate::tensor::Tensor) -> Result<Var> {
    let inv = tape.constant(reciprocal_const(den)?);
    let r = super::elementwise::mul(tape, num, &inv)?;
    let r = sqrt(tape, &r)?;
    mean(tape, &r)
}

/// The FNO paper's loss: mean over samples of ||pred_b - target_b||_2 / ||target_b||_2, both
/// [B, ...]; the target is a constant.
pub fn mean_rel_l2(tape: &mut Tape, pred: &Var, target: &Var) -> Result<Var> {
    let d = sub(tape, pred, target)?;
    let num = sample_sum_sq(tape, &d)?;
    let den = sample_sum_sq_value(target)?;
    mean_sqrt_ratio(tape, &num, &den)
}

fn flat_samples(x: &Var) -> Result<crate::tensor::Tensor> {
    let b = x.dims()[0];
    x.value().reshape([1, b, x.value().numel() / b.max(1)])
}

/// Per-sample sums of squares of a value (no tape): what [`sample_sum_sq`] records.
fn sample_sum_sq_value(x: &Var) -> Result<crate::tensor::Tensor> {
    let xr = flat_samples(x)?;
    backend::channel_dot(&xr, Some(&xr))
}

/// Central differences d/d(row) and d/d(column) of fields [B, 1, s, s] at the interior points,
/// [B, 2, s - 2, s - 2], grid spacing `h` (a convolution with a constant stencil).
pub fn central_differences(tape: &mut Tape, x: &Var, h: f64) -> Result<Var> {
    let k = 0.5 / h;
    #[rustfmt::skip]
    let w = vec![
        0.0, -k, 0.0,   0.0, 0.0, 0.0,   0.0, k, 0.0,
        0.0, 0.0, 0.0,  -k, 0.0, k,      0.0, 0.0, 0.0,
    ];
    let w = tape.constant(crate::tensor::Tensor::from_f64_vec(w, [2, 1, 3, 3], x.value().dtype(), x.value().device())?);
    super::conv::conv2d(tape, x, &w, None, backend::Conv2dParams::new(1, 0))
}

/// The relative H1 error (neuraloperator's H1Loss): mean over samples of
/// sqrt(||e||^2 + ||D e||^2) / sqrt(||u||^2 + ||D u||^2), e = pred - target, D the central
/// differences at the interior points with spacing `h`; fields [B, 1, s, s], the target constant.
pub fn mean_rel_h1(tape: &mut Tape, pred: &Var, target: &Var, h: f64) -> Result<Var> {
    let e = sub(tape, pred, target)?;
    let de = central_differences(tape, &e, h)?;
    let n0 = sample_sum_sq(tape, &e)?;
    let n1 = sample_sum_sq(tape, &de)?;
    let num = add(tape, &n0, &n1)?;
    let du = central_differences(tape, target, h)?;
    let den = backend::binary(backend::Binary::Add, &sample_sum_sq_value(target)?, &sample_sum_sq_value(&du)?)?;
    mean_sqrt_ratio(tape, &num, &den)
}
