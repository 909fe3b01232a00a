//! conv2d and conv_transpose2d with bias.

use crate::autograd::{Tape, Var};
use crate::backend::{self, Conv2dParams};
use crate::error::Result;
use crate::tensor::Tensor;

/// PyTorch's conv2d: x [B, C_in, H, W], w [C_out, C_in, kh, kw], b [C_out].
pub fn conv2d(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, p: Conv2dParams) -> Result<Var> {
    conv2d_computed(tape, x, w, b, p, || backend::conv2d(x.value(), w.value(), b.map(Var::value), p))
}

/// GELU(conv2d(x, w, b)), recorded as the two ops it is (the same nodes, kept values and
/// gradients as `conv2d` then `gelu`), with both outputs computed by one launch on a GPU
/// ([`backend::conv2d_gelu`]). In a checkpoint's recomputation that reuses the convolution's
/// output, GELU is computed from it again.
pub fn conv2d_gelu(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, p: Conv2dParams) -> Result<Var> {
    let mut activation = None;
    let z = conv2d_computed(tape, x, w, b, p, || {
        let (z, y) = backend::conv2d_gelu(x.value(), w.value(), b.map(Var::value), p)?;
        activation = Some(y);
        Ok(z)
    })?;
    super::elementwise::unary_computed(tape, &z, backend::Unary::Gelu, activation)
}

/// conv2d's node, with its output from `compute` (unless a checkpoint's recomputation reuses it).
fn conv2d_computed(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, p: Conv2dParams, compute: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let y = tape.reuse_or_keep(&inputs, compute)?;
    let sx = tape.requires_grad(w).then(|| x.value().clone());
    let sw = tape.requires_grad(x).then(|| w.value().clone());
    let (x_shape, w_shape) = (x.shape().clone(), w.shape().clone());
    let has_bias = b.is_some();
    tape.record1(&inputs, y, move |ctx| {
        let dy = ctx.grad(0).clone();
        if let Some(w) = sw {
            ctx.add_with(0, |acc| backend::conv2d_bwd_input_added(acc, &dy, &w, &x_shape, p))?;
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
