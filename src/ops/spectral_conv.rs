//! The spectral convolution: rfft2 -> mode mix -> irfft2, each a differentiable op of its own
//! (so the meta device sees the same three allocations a GPU makes).

use crate::autograd::{Tape, Var};
use crate::backend::{self, SpectralModes};
use crate::error::Result;

/// Unnormalised real 2-D FFT over the last two dimensions: [.., H, W] -> [.., H, W/2+1, 2].
pub fn rfft2(tape: &mut Tape, x: &Var) -> Result<Var> {
    let y = tape.reuse_or_keep(&[x], || backend::rfft2(x.value()))?;
    // rfft2 accepted x, so it has at least two dimensions.
    let w = x.dims()[x.dims().len() - 1];
    tape.record1(&[x], y, move |ctx| {
        let dx = backend::rfft2_bwd(ctx.grad(0), w)?;
        ctx.add(0, dx)
    })
}

/// Inverse of [`rfft2`] to width `w` (scaled 1/(HW)). A DC or Nyquist column that is not
/// Hermitian is taken by its Hermitian part (the imaginary part of its inverse is dropped).
pub fn irfft2(tape: &mut Tape, z: &Var, w: usize) -> Result<Var> {
    let y = tape.reuse_or_keep(&[z], || backend::irfft2(z.value(), w))?;
    tape.record1(&[z], y, |ctx| {
        let dz = backend::irfft2_bwd(ctx.grad(0))?;
        ctx.add(0, dz)
    })
}

/// The complex channel mix on the kept modes: xh [B, C_in, H, Wh, 2], w [C_in, C_out, R, My, 2].
pub fn spectral_mix(tape: &mut Tape, xh: &Var, w: &Var, modes: SpectralModes) -> Result<Var> {
    let y = tape.reuse_or_keep(&[xh, w], || backend::spectral_mix(xh.value(), w.value(), modes))?;
    let sx = tape.requires_grad(w).then(|| xh.value().clone());
    let sw = tape.requires_grad(xh).then(|| w.value().clone());
    let w_shape = w.shape().clone();
    tape.record1(&[xh, w], y, move |ctx| {
        if let Some(w) = sw {
            let dx = backend::spectral_mix_bwd_input(ctx.grad(0), &w, modes)?;
            ctx.add(0, dx)?;
        }
        if let Some(x) = sx {
            let dw = backend::spectral_mix_bwd_weight(&x, ctx.grad(0), &w_shape, modes)?;
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
    let xh = rfft2(tape, x)?;
    let yh = spectral_mix(tape, &xh, w, modes)?;
    drop(xh);
    irfft2(tape, &yh, width)
}
