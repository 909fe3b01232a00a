//! What the physics loss needs: complex fields from channels, a fixed probe, the 2-D FFT,
//! fftshift and the magnitude.

use crate::autograd::{Tape, Var};
use crate::backend;
use crate::error::Result;
use crate::tensor::Tensor;

/// [B, 2C, H, W] (real channels then imaginary channels) -> complex [B, C, H, W, 2].
pub fn channels_to_complex(tape: &mut Tape, x: &Var) -> Result<Var> {
    let y = backend::channels_to_complex(x.value())?;
    tape.record1(&[x], y, |ctx| {
        let dx = backend::complex_to_channels(ctx.grad(0))?;
        ctx.add(0, dx)
    })
}

/// Complex [B, C, H, W, 2] -> [B, 2C, H, W].
pub fn complex_to_channels(tape: &mut Tape, z: &Var) -> Result<Var> {
    let y = backend::complex_to_channels(z.value())?;
    tape.record1(&[z], y, |ctx| {
        let dz = backend::channels_to_complex(ctx.grad(0))?;
        ctx.add(0, dz)
    })
}

/// z * probe for a fixed complex probe [H, W, 2] (no gradient to the probe).
pub fn mul_probe(tape: &mut Tape, z: &Var, probe: &Tensor) -> Result<Var> {
    let y = backend::complex_mul(z.value(), probe, false)?;
    let p = probe.clone();
    tape.record1(&[z], y, move |ctx| {
        let dz = backend::complex_mul(ctx.grad(0), &p, true)?;
        ctx.add(0, dz)
    })
}

/// Scaling of the forward 2-D FFT, as numpy and PyTorch name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FftNorm {
    /// Unscaled forward.
    Backward,
    /// Forward scaled by 1/sqrt(HW).
    Ortho,
    /// Forward scaled by 1/(HW).
    Forward,
}

/// The forward complex 2-D FFT over (H, W) of [.., H, W, 2].
pub fn fft2(tape: &mut Tape, z: &Var, norm: FftNorm) -> Result<Var> {
    let d = z.dims();
    if d.len() < 3 {
        return Err(crate::error::Error::bad_shape("fft2", z.shape(), "expected a complex field [.., H, W, 2]"));
    }
    let n = (d[d.len() - 3] * d[d.len() - 2]) as f64;
    let scale = match norm {
        FftNorm::Backward => 1.0,
        FftNorm::Ortho => 1.0 / n.sqrt(),
        FftNorm::Forward => 1.0 / n,
    };
    let y = backend::fft2(z.value(), false, scale)?;
    // The adjoint of s F is s F^H, the unnormalised inverse times the same s.
    tape.record1(&[z], y, move |ctx| {
        let dz = backend::fft2(ctx.grad(0), true, scale)?;
        ctx.add(0, dz)
    })
}

fn shift(tape: &mut Tape, x: &Var, complex: bool, inverse: bool) -> Result<Var> {
    let d = x.dims();
    let r = d.len().saturating_sub(usize::from(complex));
    if r < 2 {
        return Err(crate::error::Error::bad_shape("fftshift", x.shape(), "needs [.., H, W]"));
    }
    let (h, w) = (d[r - 2], d[r - 1]);
    let fwd = (h / 2, w / 2);
    let back = (h - h / 2, w - w / 2);
    let (there, home) = if inverse { (back, fwd) } else { (fwd, back) };
    let y = backend::roll2d(x.value(), there.0, there.1, complex)?;
    tape.record1(&[x], y, move |ctx| {
        let dx = backend::roll2d(ctx.grad(0), home.0, home.1, complex)?;
        ctx.add(0, dx)
    })
}

/// numpy.roll of `x` seen as a [numel / W, W] matrix (W its last dimension): y[i + rows, j + cols]
/// = x[i, j], both cyclic. Rolling the rows of a [B, C, H, W] tensor by a multiple of C H moves
/// whole samples along the batch; the overlap term pairs samples this way.
pub fn roll_flat(tape: &mut Tape, x: &Var, rows: usize, cols: usize) -> Result<Var> {
    let dims = x.dims().to_vec();
    let w = dims.last().copied().unwrap_or(0);
    if w == 0 || x.value().numel() == 0 {
        return Err(crate::error::Error::bad_shape("roll_flat", x.shape(), "needs a non-empty [.., W]"));
    }
    let h = x.value().numel() / w;
    let (rows, cols) = (rows % h, cols % w);
    let y = backend::roll2d(&x.value().reshape([h, w])?, rows, cols, false)?.reshape(dims.clone())?;
    tape.record1(&[x], y, move |ctx| {
        let g = ctx.grad(0).reshape([h, w])?;
        let dx = backend::roll2d(&g, (h - rows) % h, (w - cols) % w, false)?.reshape(dims)?;
        ctx.add(0, dx)
    })
}

/// numpy's fftshift over (H, W): the zero frequency moves to (H/2, W/2). `complex` says the
/// tensor is [.., H, W, 2].
pub fn fftshift(tape: &mut Tape, x: &Var, complex: bool) -> Result<Var> {
    shift(tape, x, complex, false)
}

/// numpy's ifftshift over (H, W), the inverse of [`fftshift`] (they differ for odd sizes).
pub fn ifftshift(tape: &mut Tape, x: &Var, complex: bool) -> Result<Var> {
    shift(tape, x, complex, true)
}

/// |z| of a complex [.., 2] tensor. The gradient at z = 0 is defined as 0 (a subgradient).
pub fn complex_abs(tape: &mut Tape, z: &Var) -> Result<Var> {
    let y = backend::complex_abs(z.value())?;
    let saved = tape.requires_grad(z).then(|| z.value().clone());
    tape.record1(&[z], y, move |ctx| {
        if let Some(z) = saved {
            let dz = backend::complex_abs_bwd(&z, ctx.grad(0))?;
            ctx.add(0, dz)?;
        }
        Ok(())
    })
}

/// arg z = atan2(im, re) of a complex [.., 2] tensor; the gradient at z = 0 is defined as 0.
pub fn complex_angle(tape: &mut Tape, z: &Var) -> Result<Var> {
    let y = backend::complex_angle(z.value())?;
    let saved = tape.requires_grad(z).then(|| z.value().clone());
    tape.record1(&[z], y, move |ctx| {
        if let Some(z) = saved {
            let dz = backend::complex_angle_bwd(&z, ctx.grad(0))?;
            ctx.add(0, dz)?;
        }
        Ok(())
    })
}
