//! Element-wise ops, per-channel scaling, the LayerScale residual and channel concatenation.

use crate::autograd::{Tape, Var};
use crate::backend::{self, Binary, Unary};
use crate::error::Result;
use crate::tensor::{Precision, Tensor};

fn unary_op(tape: &mut Tape, x: &Var, op: Unary) -> Result<Var> {
    unary_computed(tape, x, op, None)
}

/// The node of `op` on x, its output `computed` beforehand (by a fused launch) or computed now
/// (`None`, or a checkpoint's recomputation that reuses it).
pub(super) fn unary_computed(tape: &mut Tape, x: &Var, op: Unary, computed: Option<Tensor>) -> Result<Var> {
    let y = tape.reuse_or(&[x], || computed.map_or_else(|| backend::unary(op, x.value()), Ok))?;
    let saved = tape.requires_grad(x).then(|| x.value().clone());
    tape.record1(&[x], y, move |ctx| {
        if let Some(x) = saved {
            let dx = backend::unary_bwd(op, &x, ctx.grad(0))?;
            ctx.add(0, dx)?;
        }
        Ok(())
    })
}

/// GELU, exact erf form: x Phi(x).
pub fn gelu(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::Gelu)
}

/// |x|, with gradient 0 at 0.
pub fn abs(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::Abs)
}

pub fn sqrt(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::Sqrt)
}

pub fn square(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::Square)
}

/// ln x.
pub fn log(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::Log)
}

/// An angle wrapped to [-pi, pi); its gradient is 1 (the wrap is a shift by whole turns).
pub fn wrap_angle(tape: &mut Tape, x: &Var) -> Result<Var> {
    unary_op(tape, x, Unary::WrapAngle)
}

/// Rounds x through the given precision, as a mixed-precision GPU stores an activation or casts
/// a weight: y = round(x), and the gradient is rounded the same way (dx = round(dy)), as the
/// backward of a low-precision op produces it. An fp16 gradient beyond +-65504 becomes inf: the
/// overflow that dynamic loss scaling detects. fp32 is the identity and records nothing.
pub fn round_to(tape: &mut Tape, x: &Var, precision: Precision) -> Result<Var> {
    let op = match precision {
        Precision::Fp32 => return Ok(x.clone()),
        Precision::Fp16 => Unary::RoundF16,
        Precision::Bf16 => Unary::RoundBf16,
    };
    let y = backend::unary(op, x.value())?;
    tape.record1(&[x], y, move |ctx| {
        let dx = backend::unary(op, ctx.grad(0))?;
        ctx.add(0, dx)
    })
}

pub fn add(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    add_computed(tape, a, b, || backend::binary(Binary::Add, a.value(), b.value()))
}

/// GELU(a + b), recorded as the two ops it is (the same nodes and gradients as `add` then
/// `gelu`), with both outputs computed by one launch on a GPU ([`backend::add_gelu`]).
pub fn add_gelu(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    let mut activation = None;
    let sum = add_computed(tape, a, b, || {
        let (sum, y) = backend::add_gelu(a.value(), b.value())?;
        activation = Some(y);
        Ok(sum)
    })?;
    unary_computed(tape, &sum, Unary::Gelu, activation)
}

fn add_computed(tape: &mut Tape, a: &Var, b: &Var, compute: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
    let y = tape.reuse_or(&[a, b], compute)?;
    tape.record1(&[a, b], y, |ctx| {
        let g = ctx.grad(0).clone();
        ctx.add(0, g.clone())?;
        ctx.add(1, g)
    })
}

pub fn sub(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    let y = backend::binary(Binary::Sub, a.value(), b.value())?;
    tape.record1(&[a, b], y, |ctx| {
        let g = ctx.grad(0).clone();
        if ctx.needs(1) {
            ctx.add(1, backend::affine(&g, -1.0, 0.0)?)?;
        }
        ctx.add(0, g)
    })
}

pub fn mul(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    let y = backend::binary(Binary::Mul, a.value(), b.value())?;
    let sa = tape.requires_grad(b).then(|| a.value().clone());
    let sb = tape.requires_grad(a).then(|| b.value().clone());
    tape.record1(&[a, b], y, move |ctx| {
        if let Some(b) = sb {
            let da = backend::binary(Binary::Mul, ctx.grad(0), &b)?;
            ctx.add(0, da)?;
        }
        if let Some(a) = sa {
            let db = backend::binary(Binary::Mul, ctx.grad(0), &a)?;
            ctx.add(1, db)?;
        }
        Ok(())
    })
}

/// alpha * x for a constant alpha.
pub fn scale(tape: &mut Tape, x: &Var, alpha: f64) -> Result<Var> {
    let y = backend::affine(x.value(), alpha, 0.0)?;
    tape.record1(&[x], y, move |ctx| {
        let dx = backend::affine(ctx.grad(0), alpha, 0.0)?;
        ctx.add(0, dx)
    })
}

/// x + c for a constant c.
pub fn add_scalar(tape: &mut Tape, x: &Var, c: f64) -> Result<Var> {
    let y = backend::affine(x.value(), 1.0, c)?;
    tape.record1(&[x], y, |ctx| {
        let g = ctx.grad(0).clone();
        ctx.add(0, g)
    })
}

/// x * s for a one-element s.
pub fn mul_scalar(tape: &mut Tape, x: &Var, s: &Var) -> Result<Var> {
    let y = backend::scale_by(x.value(), s.value(), false)?;
    let sx = tape.requires_grad(s).then(|| x.value().clone());
    let ss = tape.requires_grad(x).then(|| s.value().clone());
    let s_shape = s.shape().clone();
    tape.record1(&[x, s], y, move |ctx| {
        if let Some(s) = ss {
            let dx = backend::scale_by(ctx.grad(0), &s, false)?;
            ctx.add(0, dx)?;
        }
        if let Some(x) = sx {
            let ds = backend::dot(ctx.grad(0), &x)?.reshape(s_shape)?;
            ctx.add(1, ds)?;
        }
        Ok(())
    })
}

/// x / s for a one-element s. ds = -sum(dy * y) / s.
pub fn div_scalar(tape: &mut Tape, x: &Var, s: &Var) -> Result<Var> {
    let y = backend::scale_by(x.value(), s.value(), true)?;
    let need_s = tape.requires_grad(s);
    let s_val = s.value().clone();
    let s_shape = s.shape().clone();
    let sy = need_s.then(|| y.clone());
    tape.record1(&[x, s], y, move |ctx| {
        if ctx.needs(0) {
            let dx = backend::scale_by(ctx.grad(0), &s_val, true)?;
            ctx.add(0, dx)?;
        }
        if let Some(y) = sy {
            let t = backend::dot(ctx.grad(0), &y)?;
            let ds = backend::affine(&backend::scale_by(&t, &s_val, true)?, -1.0, 0.0)?;
            ctx.add(1, ds.reshape(s_shape)?)?;
        }
        Ok(())
    })
}

/// y[b, c, ...] = x[b, c, ...] * l[c].
pub fn channel_scale(tape: &mut Tape, x: &Var, l: &Var) -> Result<Var> {
    let y = backend::channel_scale(x.value(), l.value())?;
    let sx = tape.requires_grad(l).then(|| x.value().clone());
    let sl = tape.requires_grad(x).then(|| l.value().clone());
    tape.record1(&[x, l], y, move |ctx| {
        if let Some(l) = sl {
            let dx = backend::channel_scale(ctx.grad(0), &l)?;
            ctx.add(0, dx)?;
        }
        if let Some(x) = sx {
            let dl = backend::channel_dot(ctx.grad(0), Some(&x))?;
            ctx.add(1, dl)?;
        }
        Ok(())
    })
}

/// The LayerScale residual y = x + l[c] * branch: one fused kernel forward, and one fused
/// backward (dbranch = l dy and dl = sum dy branch together) when both need a gradient.
pub fn layerscale(tape: &mut Tape, x: &Var, branch: &Var, l: &Var) -> Result<Var> {
    let y = tape.reuse_or(&[x, branch, l], || backend::layerscale(x.value(), branch.value(), l.value()))?;
    let sb = tape.requires_grad(l).then(|| branch.value().clone());
    let sl = tape.requires_grad(branch).then(|| l.value().clone());
    tape.record1(&[x, branch, l], y, move |ctx| {
        let g = ctx.grad(0).clone();
        match (sl, sb) {
            (Some(l), Some(b)) => {
                let (db, dl) = backend::layerscale_bwd(&g, &b, &l)?;
                ctx.add(1, db)?;
                ctx.add(2, dl)?;
            }
            (Some(l), None) => ctx.add(1, backend::channel_scale(&g, &l)?)?,
            (None, Some(b)) => ctx.add(2, backend::channel_dot(&g, Some(&b))?)?,
            (None, None) => {}
        }
        ctx.add(0, g)
    })
}

/// Concatenation along channels of [B, C_i, ...] values.
pub fn concat_channels(tape: &mut Tape, parts: &[&Var]) -> Result<Var> {
    let values: Vec<&crate::tensor::Tensor> = parts.iter().map(|v| v.value()).collect();
    let y = backend::concat_channels(&values)?;
    let widths: Vec<usize> = parts.iter().map(|v| v.dims()[1]).collect();
    tape.record1(parts, y, move |ctx| {
        if (0..widths.len()).all(|i| ctx.needs(i)) {
            // Every part's gradient: cut in one pass (one launch for two parts on a GPU).
            for (i, g) in backend::split_channels(ctx.grad(0), &widths)?.into_iter().enumerate() {
                ctx.add(i, g)?;
            }
            return Ok(());
        }
        let mut off = 0;
        for (i, &w) in widths.iter().enumerate() {
            if ctx.needs(i) {
                let g = backend::slice_channels(ctx.grad(0), off, w)?;
                ctx.add(i, g)?;
            }
            off += w;
        }
        Ok(())
    })
}
