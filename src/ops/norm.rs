//! LayerNorm (over channels), RMSNorm (over channels) and InstanceNorm (over H x W), with an
//! optional per-channel affine (gamma, beta).

use crate::autograd::{Tape, Var};
use crate::backend::{self, NormKind};
use crate::error::Result;

/// Normalises x [B, C, ...] as `kind` says, then y = xhat * gamma + beta when given.
pub fn norm(tape: &mut Tape, kind: NormKind, x: &Var, gamma: Option<&Var>, beta: Option<&Var>, eps: f64) -> Result<Var> {
    let out = backend::norm(kind, x.value(), gamma.map(Var::value), beta.map(Var::value), eps)?;
    let mut inputs = vec![x];
    let gamma_at = gamma.map(|g| {
        inputs.push(g);
        inputs.len() - 1
    });
    let beta_at = beta.map(|b| {
        inputs.push(b);
        inputs.len() - 1
    });
    let any = inputs.iter().any(|v| tape.requires_grad(v));
    let saved = any.then(|| (x.value().clone(), gamma.map(|g| g.value().clone()), out.mean, out.rstd));
    tape.record1(&inputs, out.y, move |ctx| {
        let Some((x, gamma, mean, rstd)) = saved else { return Ok(()) };
        let want_g = gamma_at.is_some_and(|i| ctx.needs(i));
        let want_b = beta_at.is_some_and(|i| ctx.needs(i));
        let (dx, dg, db) = backend::norm_bwd(kind, &x, ctx.grad(0), gamma.as_ref(), &mean, &rstd, want_g, want_b)?;
        ctx.add(0, dx)?;
        if let (Some(i), Some(dg)) = (gamma_at, dg) {
            ctx.add(i, dg)?;
        }
        if let (Some(i), Some(db)) = (beta_at, db) {
            ctx.add(i, db)?;
        }
        Ok(())
    })
}

pub fn layer_norm(tape: &mut Tape, x: &Var, gamma: Option<&Var>, beta: Option<&Var>, eps: f64) -> Result<Var> {
    norm(tape, NormKind::LayerNorm, x, gamma, beta, eps)
}

pub fn rms_norm(tape: &mut Tape, x: &Var, gamma: Option<&Var>, eps: f64) -> Result<Var> {
    norm(tape, NormKind::RmsNorm, x, gamma, None, eps)
}

pub fn instance_norm(tape: &mut Tape, x: &Var, gamma: Option<&Var>, beta: Option<&Var>, eps: f64) -> Result<Var> {
    norm(tape, NormKind::InstanceNorm, x, gamma, beta, eps)
}
