//! The backend: every op the engine computes, one folder per op family, each named after its
//! kernels/<family>.cu:
//!
//! - `<family>/mod.rs`: the op's geometry (the only shape check; it gives every output shape, and
//!   where the op has a kernel it is the `#[repr(C)]` struct of kernels/params.cuh the kernel takes
//!   by value) and the dispatch: allocate the outputs from the geometry, then run on the device;
//! - `<family>/cpu.rs`: the reference kernels on slices (the numerical specification);
//! - `<family>/cuda.rs`: the launchers, which check every length against the geometry and call the
//!   typed launcher that build.rs generates from the kernel's C signature (`kernels`).
//!
//! Outputs are made by the dispatch functions, never by kernels, and [`on_device`] (the one match
//! on the device) runs nothing on the meta device: so the meta device counts exactly the bytes the
//! CPU or a GPU holds. Everything above this module is device-agnostic.
//!
//! Layouts: activations are NCHW, row-major. Complex tensors carry a trailing dimension of 2
//! (re, im). Conv weights are [C_out, C_in, kh, kw]; transposed-conv weights [C_in, C_out, kh, kw];
//! spectral weights [C_in, C_out, R, M_y, 2] for the R kept rows and M_y kept columns.

pub mod cpu;
pub mod gpu;
pub mod kernels;
pub mod profile;

pub mod agc;
pub mod complex;
pub mod conv;
pub mod elementwise;
pub mod fft;
pub mod layerscale;
pub mod layout;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod spectral;

pub use agc::{agc, Units};
pub use complex::{complex_abs, complex_abs_bwd, complex_angle, complex_angle_bwd, complex_mul};
pub use conv::{conv2d, conv2d_bwd_input, conv2d_bwd_input_added, conv2d_bwd_params, conv2d_bwd_weight, conv2d_gelu, conv_transpose2d, Conv2dParams};
pub use elementwise::{add_gelu, add_into, affine, binary, broadcast_scalar, clamp, scale_by, scale_in_place, unary, unary_bwd, Binary, Unary};
pub use fft::{fft2, irfft2, irfft2_bwd, irfft2_bwd_unscaled, irfft2_ready, rfft2, rfft2_bwd, rfft2_bwd_ready, ReadySpectrum, UnscaledSpectrum};
pub use layerscale::{layerscale, layerscale_bwd};
pub use layout::{channel_dot, channel_scale, channels_to_complex, complex_to_channels, concat_channels, roll2d, slice_channels, split_channels};
pub use norm::{norm, norm_bwd, NormKind, NormOut};
pub use optim::{adam_step, sgd_step, AdamStep, AdamTensors, SgdStep};
pub use reduce::{dot, reduce, reduce_each, Reduce};
pub use spectral::{
    spectral_mix, spectral_mix_bwd_input, spectral_mix_bwd_input_ready, spectral_mix_bwd_weight, spectral_mix_bwd_weight_unscaled, spectral_mix_ready,
    ModeConvention, SpectralModes,
};

use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};
use gpu::Gpu;

/// Runs an op on `dev`, writing into `out` (its outputs, already made by the dispatch): the CPU's
/// reference kernel or the GPU's launcher. On the meta device nothing runs. This is the one place
/// that matches on the device.
pub(crate) fn on_device<T>(dev: &Device, out: T, cpu: impl FnOnce(T) -> Result<()>, cuda: impl FnOnce(&Gpu, T) -> Result<()>) -> Result<()> {
    match dev.kind() {
        DeviceKind::Meta => Ok(()),
        DeviceKind::Cpu => cpu(out),
        DeviceKind::Cuda(_) => cuda(dev.gpu()?, out),
    }
}

/// A fresh output of `shape` on `like`'s device and dtype, computed by `cpu` or `cuda`. The output
/// starts zeroed on the CPU and undefined on a GPU ([`Tensor::uninit`]): a GPU launcher writes
/// every element (or clears what it does not write).
pub(crate) fn compute(
    shape: impl Into<Shape>,
    like: &Tensor,
    cpu: impl FnOnce(&mut Tensor) -> Result<()>,
    cuda: impl FnOnce(&Gpu, &mut Tensor) -> Result<()>,
) -> Result<Tensor> {
    let mut y = Tensor::uninit(shape, like.dtype(), like.device())?;
    on_device(like.device(), &mut y, cpu, cuda)?;
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// Operand checks shared by the families' geometries

pub(crate) fn check_compute(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_compute() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype: t.dtype(), why: "kernels compute in f32 or f64; cast f16/bf16 storage first" })
    }
}

/// All operands share one device and one compute dtype.
pub(crate) fn check_same(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let first = ts[0];
    check_compute(op, first)?;
    for t in &ts[1..] {
        if t.device() != first.device() {
            return Err(Error::DeviceMismatch { op, lhs: first.device().to_string(), rhs: t.device().to_string() });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DTypeMismatch { op, lhs: first.dtype(), rhs: t.dtype() });
        }
    }
    Ok(())
}

pub(crate) fn check_rank(op: &'static str, t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), format!("{what} must have {rank} dimensions")))
    }
}

pub(crate) fn check_eq(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(Error::mismatch(op, a.shape(), b.shape()))
    }
}

pub(crate) fn check_complex(op: &'static str, t: &Tensor, min_rank: usize) -> Result<()> {
    if t.rank() >= min_rank && t.dims()[t.rank() - 1] == 2 {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), format!("expected a complex tensor: at least {min_rank} dimensions, the last of size 2")))
    }
}

pub(crate) fn check_one(op: &'static str, t: &Tensor) -> Result<()> {
    if t.numel() == 1 {
        Ok(())
    } else {
        Err(Error::bad_shape(op, t.shape(), "expected a one-element tensor"))
    }
}

pub(crate) fn check_spatial(op: &'static str, x: &Tensor) -> Result<()> {
    if x.rank() < 2 || x.dims()[x.rank() - 1] == 0 || x.dims()[x.rank() - 2] == 0 {
        return Err(Error::bad_shape(op, x.shape(), "expected [..., H, W] with H, W >= 1"));
    }
    Ok(())
}

/// [B, C, S...] views: (B, C, S).
pub(crate) fn bcs(t: &Tensor) -> (usize, usize, usize) {
    let d = t.dims();
    (d[0], d[1], d[2..].iter().product())
}

/// A dimension as the kernels' `int`.
pub(crate) fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("size {v} does not fit a 32-bit kernel index")))
}

/// Makes `t`'s storage its own (copying it if shared), so that it can be written in place.
pub(crate) fn own(t: &mut Tensor) -> Result<()> {
    if !t.is_unique() {
        *t = affine(t, 1.0, 0.0)?;
    }
    Ok(())
}
