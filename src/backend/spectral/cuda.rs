//! Launchers of kernels/spectral.cu. Complex buffers are interleaved (re, im) f32: spectra
//! [B, C, H, Wh, 2], weights [Ci, Co, R, My, 2]. The kernels derive the kept rows from the
//! geometry (rows 0..pos, then the last R - pos rows), so nothing but the tensors is uploaded.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::SpectralGeom;
use crate::backend::gpu::{check_len, elementwise_config, per_block_config, Gpu, BLOCK};
use crate::backend::kernels;
use crate::backend::kernels::SpectrumGeom;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Where a mix kernel also writes its result made ready for cuFFT's C2R, and the glue's geometry.
pub(crate) type Ready<'a> = Option<(&'a mut CudaSlice<f32>, SpectrumGeom)>;

/// The ready buffer's launch arguments (a null buffer and an unused geometry without one).
fn ready_args<'a>(op: &'static str, ready: Ready<'a>, len: usize) -> Result<(Option<&'a mut CudaSlice<f32>>, SpectrumGeom)> {
    match ready {
        Some((buf, sg)) => {
            check_len(op, "ready", buf, len)?;
            Ok((Some(buf), sg))
        }
        None => Ok((None, SpectrumGeom { planes: 0, h: 0, wh: 0, w: 0, adjoint: 0, norm: 0.0 })),
    }
}

/// Samples per thread of the mix's forward and dX (kernels/spectral.cu's MIX_BB).
const MIX_BB: usize = 16;

/// The mix's forward and dX launch (kernels/spectral.cu's mix_all): first one thread per (group
/// of MIX_BB samples, output channel, kept mode), then blocks that write the zeros of the other
/// modes, about 8 elements a thread.
fn mix_config(op: &'static str, g: SpectralGeom, channels: usize) -> Result<LaunchConfig> {
    let b = g.b as usize;
    let tiles = (b.div_ceil(MIX_BB) * channels * g.r as usize * g.my as usize).div_ceil(BLOCK as usize);
    let zeros = (b * channels * g.h as usize * g.wh as usize).div_ceil(8 * BLOCK as usize).max(1);
    per_block_config(tiles + zeros).map_err(|_| Error::invalid(op, format!("{} blocks exceed the grid", tiles + zeros)))
}

/// y = mix(x, w) on the kept modes, zero elsewhere (the kernel writes every mode); with `ready`,
/// also y made ready for the C2R of irfft2.
pub(super) fn spectral_mix_fwd(gpu: &Gpu, g: SpectralGeom, x: &Tensor, w: &Tensor, y: &mut Tensor, ready: Ready) -> Result<()> {
    const OP: &str = "spectral_mix_fwd_f32";
    let (x, w, y) = (x.cuda()?, w.cuda()?, y.cuda_mut()?);
    check_len(OP, "x", x, g.spectrum(g.ci))?;
    check_len(OP, "w", w, g.weight())?;
    check_len(OP, "y", y, g.spectrum(g.co))?;
    let (mut ready, sg) = ready_args(OP, ready, g.spectrum(g.co))?;
    let cfg = mix_config(OP, g, g.co as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::spectral_mix_fwd_f32(gpu, cfg, x, w, y, &mut ready, g, sg) }
}

/// dx = sum_o dy conj(w) on the kept modes, zero elsewhere; with `ready`, also dx made ready for
/// the C2R of rfft2's adjoint. `dy_w` > 0: dy is the unscaled R2C of width-dy_w images (the
/// kernel applies irfft2's adjoint's column scale as it reads).
pub(super) fn spectral_mix_bwd_input(gpu: &Gpu, g: SpectralGeom, dy: &Tensor, w: &Tensor, dx: &mut Tensor, ready: Ready, dy_w: i32) -> Result<()> {
    const OP: &str = "spectral_mix_bwd_input_f32";
    let (dy, w, dx) = (dy.cuda()?, w.cuda()?, dx.cuda_mut()?);
    check_len(OP, "dy", dy, g.spectrum(g.co))?;
    check_len(OP, "w", w, g.weight())?;
    check_len(OP, "dx", dx, g.spectrum(g.ci))?;
    let (mut ready, sg) = ready_args(OP, ready, g.spectrum(g.ci))?;
    let cfg = mix_config(OP, g, g.ci as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::spectral_mix_bwd_input_f32(gpu, cfg, dy, w, dx, &mut ready, g, sg, dy_w) }
}

/// dw = sum_b conj(x) dy (`dy_w` as for [`spectral_mix_bwd_input`]).
pub(super) fn spectral_mix_bwd_weight(gpu: &Gpu, g: SpectralGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor, dy_w: i32) -> Result<()> {
    const OP: &str = "spectral_mix_bwd_weight_f32";
    let (x, dy, dw) = (x.cuda()?, dy.cuda()?, dw.cuda_mut()?);
    check_len(OP, "x", x, g.spectrum(g.ci))?;
    check_len(OP, "dy", dy, g.spectrum(g.co))?;
    check_len(OP, "dw", dw, g.weight())?;
    let cfg = elementwise_config(g.weight() / 2);
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::spectral_mix_bwd_weight_f32(gpu, cfg, x, dy, dw, g, dy_w) }
}
