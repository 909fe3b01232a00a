//! conv2d and conv_transpose2d with bias.

use crate::autograd::{Tape, Var};
use crate::backend::{self, Conv2dParams};
use crate::error::Result;

/// PyTorch's conv2d: x [B, C_in, H, W], w [C_out, C_in, kh, kw], b [C_out].
pub fn conv2d(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, p: Conv2dParams) -> Result<Var> {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let y = tape.reuse_or_keep(&inputs, || backend::conv2d(x.value(), w.value(), b.map(Var::value), p))?;
    let sx = tape.requires_grad(w).then(|| x.value().clone());
    let sw = tape.requires_grad(x).then(|| w.value().clone());
    let (x_shape, w_shape) = (x.shape().clone(), w.shape().clone());
    let has_bias = b.is_some();
    tape.record1(&inputs, y, move |ctx| {
        let dy = ctx.grad(0).clone();
        if let Some(w) = sw {
            ctx.add(0, backend::conv2d_bwd_input(&dy, &w, &x_shape, p)?)?;
        }
        let want_db = has_bias && ctx.needs(2);
        match sx {
            Some(x) => {
                // The bias gradient from the weight gradient's own pass over dy.
                let (dw, db) = backend::conv2d_bwd_params(&x, &dy, &w_shape, p, want_db)?;
                ctx.add(1, dw)?;
                if let Some(db) = db {
                    ctx.add(2, db)?;
                }
            }
            None if want_db => ctx.add(2, backend::channel_dot(&dy, None)?)?,
            None => {}
        }
        Ok(())
    })
}

/// PyTorch's conv_transpose2d (output padding 0): x [B, C_in, H, W], w [C_in, C_out, kh, kw].
/// It is the adjoint of conv2d: its backward runs conv2d forward (for dx) and conv2d's weight
/// gradient with the roles of input and output exchanged (for dw).
pub fn conv_transpose2d(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, p: Conv2dParams) -> Result<Var> {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let y = tape.reuse_or_keep(&inputs, || backend::conv_transpose2d(x.value(), w.value(), b.map(Var::value), p))?;
    let sx = tape.requires_grad(w).then(|| x.value().clone());
    let sw = tape.requires_grad(x).then(|| w.value().clone());
    let w_shape = w.shape().clone();
    let has_bias = b.is_some();
    tape.record1(&inputs, y, move |ctx| {
        let dy = ctx.grad(0).clone();
        if let Some(w) = sw {
            ctx.add(0, backend::conv2d(&dy, &w, None, p)?)?;
        }
        if let Some(x) = sx {
            ctx.add(1, backend::conv2d_bwd_weight(&dy, &x, &w_shape, p)?)?;
        }
        if has_bias && ctx.needs(2) {
            ctx.add(2, backend::channel_dot(&dy, None)?)?;
        }
        Ok(())
    })
}
