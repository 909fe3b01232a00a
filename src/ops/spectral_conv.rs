//! The spectral convolution: rfft2 -> mode mix -> irfft2, each a differentiable op of its own
//! (so the meta device sees the same three allocations a GPU makes). Inside [`spectral_conv`] the
//! mix's launches on a GPU also make their results ready for the inverse transforms that follow
//! (irfft2 in the forward, rfft2's adjoint in the backward), which then run without a glue launch,
//! and irfft2's backward hands the mix its R2C before the column scale, which the mix's two
//! backward products apply as they read: the same nodes, values and gradients, three launches
//! fewer per layer.

use std::cell::RefCell;
use std::rc::Rc;

use crate::autograd::{Tape, Var};
use crate::backend::{self, ReadySpectrum, SpectralModes, UnscaledSpectrum};
use crate::error::Result;

/// Unnormalised real 2-D FFT over the last two dimensions: [.., H, W] -> [.., H, W/2+1, 2].
pub fn rfft2(tape: &mut Tape, x: &Var) -> Result<Var> {
    rfft2_node(tape, x, None)
}

/// rfft2's node; its backward takes the spectrum the next op's backward made ready, if any.
fn rfft2_node(tape: &mut Tape, x: &Var, ready_dx: Option<Rc<RefCell<Option<ReadySpectrum>>>>) -> Result<Var> {
    let y = tape.reuse_or_keep(&[x], || backend::rfft2(x.value()))?;
    // rfft2 accepted x, so it has at least two dimensions.
    let w = x.dims()[x.dims().len() - 1];
    tape.record1(&[x], y, move |ctx| {
        let ready = ready_dx.and_then(|r| r.borrow_mut().take());
        let dx = backend::rfft2_bwd_ready(ctx.grad(0), w, ready)?;
        ctx.add(0, dx)
    })
}

/// Inverse of [`rfft2`] to width `w` (scaled 1/(HW)). A DC or Nyquist column that is not
/// Hermitian is taken by its Hermitian part (the imaginary part of its inverse is dropped).
pub fn irfft2(tape: &mut Tape, z: &Var, w: usize) -> Result<Var> {
    irfft2_node(tape, z, w, None, None)
}

/// irfft2's node, from the spectrum the mix made ready, if any. With `unscaled_dz`, its backward
/// leaves the column scale to the node that takes z's gradient (it must be the only one) and says
/// so there.
fn irfft2_node(tape: &mut Tape, z: &Var, w: usize, ready: Option<ReadySpectrum>, unscaled_dz: Option<Rc<RefCell<Option<UnscaledSpectrum>>>>) -> Result<Var> {
    let y = tape.reuse_or_keep(&[z], || backend::irfft2_ready(z.value(), w, ready))?;
    tape.record1(&[z], y, move |ctx| {
        let dz = match unscaled_dz {
            Some(cell) => {
                let (dz, unscaled) = backend::irfft2_bwd_unscaled(ctx.grad(0))?;
                *cell.borrow_mut() = unscaled;
                dz
            }
            None => backend::irfft2_bwd(ctx.grad(0))?,
        };
        ctx.add(0, dz)
    })
}

/// The complex channel mix on the kept modes: xh [B, C_in, H, Wh, 2], w [C_in, C_out, R, My, 2].
pub fn spectral_mix(tape: &mut Tape, xh: &Var, w: &Var, modes: SpectralModes) -> Result<Var> {
    spectral_mix_node(tape, xh, w, modes, None)
}

/// Inside a spectral convolution of width-`width` maps: the mix's forward makes Y ready for the
/// irfft2 after it (`y`), its backward dX for rfft2's adjoint before it (`dx`, which rfft2's
/// backward, the next to run, takes), and reads dY as irfft2's backward left it (`dy`, which that
/// backward, the one before, fills when it leaves the column scale to the mix).
struct Ready<'a> {
    width: usize,
    y: &'a mut Option<ReadySpectrum>,
    dx: Rc<RefCell<Option<ReadySpectrum>>>,
    dy: Rc<RefCell<Option<UnscaledSpectrum>>>,
}

fn spectral_mix_node(tape: &mut Tape, xh: &Var, w: &Var, modes: SpectralModes, ready: Option<Ready>) -> Result<Var> {
    let (y, ready_dx) = match ready {
        Some(r) => {
            let y = tape.reuse_or_keep(&[xh, w], || {
                let (y, ready_y) = backend::spectral_mix_ready(xh.value(), w.value(), modes, r.width)?;
                *r.y = ready_y;
                Ok(y)
            })?;
            (y, Some((r.width, r.dx, r.dy)))
        }
        None => (tape.reuse_or_keep(&[xh, w], || backend::spectral_mix(xh.value(), w.value(), modes))?, None),
    };
    let sx = tape.requires_grad(w).then(|| xh.value().clone());
    let sw = tape.requires_grad(xh).then(|| w.value().clone());
    let w_shape = w.shape().clone();
    tape.record1(&[xh, w], y, move |ctx| {
        // dY as irfft2's backward handed it: without its column scale, when it says so.
        let unscaled = ready_dx.as_ref().and_then(|(_, _, dy)| dy.borrow_mut().take());
        if let Some(w) = sw {
            let dx = match &ready_dx {
                Some((width, cell, _)) => {
                    let (dx, ready) = backend::spectral_mix_bwd_input_ready(ctx.grad(0), &w, modes, *width, unscaled.as_ref())?;
                    *cell.borrow_mut() = ready;
                    dx
                }
                None => backend::spectral_mix_bwd_input(ctx.grad(0), &w, modes)?,
            };
            ctx.add(0, dx)?;
        }
        if let Some(x) = sx {
            let dw = backend::spectral_mix_bwd_weight_unscaled(&x, ctx.grad(0), unscaled.as_ref(), &w_shape, modes)?;
            ctx.add(1, dw)?;
        }
        Ok(())
    })
}

/// Spectral convolution of x [B, C_in, H, W] with weight [C_in, C_out, R, My, 2]:
/// irfft2(mix(rfft2(x))) to [B, C_out, H, W]. No bias.
pub fn spectral_conv(tape: &mut Tape, x: &Var, w: &Var, modes: SpectralModes) -> Result<Var> {
    if x.value().rank() != 4 {
        return Err(crate::error::Error::bad_shape("spectral_conv", x.shape(), "input must be [B, C, H, W]"));
    }
    let width = x.dims()[3];
    // xh's only consumer is the mix, so its gradient is exactly the mix's dX: the spectrum the
    // mix's backward makes ready is the one rfft2's backward transforms (it checks that it is).
    // Likewise yh's only consumer is irfft2, so the mix's backward reads exactly the gradient
    // irfft2's backward hands over.
    let ready_dx = Rc::new(RefCell::new(None));
    let unscaled_dy = Rc::new(RefCell::new(None));
    let xh = rfft2_node(tape, x, Some(ready_dx.clone()))?;
    let mut ready_y = None;
    let yh = spectral_mix_node(tape, &xh, w, modes, Some(Ready { width, y: &mut ready_y, dx: ready_dx, dy: unscaled_dy.clone() }))?;
    drop(xh);
    irfft2_node(tape, &yh, width, ready_y, Some(unscaled_dy))
}
