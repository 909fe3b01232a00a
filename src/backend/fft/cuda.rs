//! FFTs on the GPU: cuFFT plans cached by shape, with the spectrum glue of kernels/fft.cu that
//! makes them compute exactly what the CPU's rfft2 / irfft2 / fft2 compute (fft/cpu.rs):
//!
//! - rfft2: one batched 2-D R2C transform; its adjoint-of-irfft2 variant then scales column ky by
//!   c_ky / (H W) (`spectrum_col_scale_f32`).
//! - irfft2: `irfft_prep_f32` copies the half spectrum, scaled by 1 / (H W) (or, for the adjoint of
//!   rfft2, by 1 / c_ky), with its DC and Nyquist columns replaced by their Hermitian part; a
//!   batched 2-D C2R transform of that copy is the CPU's irfft2 (column inverse, imaginary parts
//!   of the DC/Nyquist bins dropped, row C2R), and the input is never overwritten.
//! - fft2: the input copied into the output, one in-place batched 2-D C2C transform, and a scale.
//!
//! Plans are made without cuFFT's own work area: each execution takes one from the memory pool
//! (so it is counted in the pool's peak and returned right after, in stream order).

use std::collections::hash_map::Entry;
use std::ffi::c_void;

use cudarc::cufft::{result as cufft, sys as fsys};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{Spectrum, SpectrumGeom};
use crate::backend::elementwise::cuda::scale_in_place;
use crate::backend::gpu::{check_len, elementwise_config, Gpu};
use crate::backend::{int, kernels};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FftKind {
    R2C,
    C2R,
    C2C,
}

/// What a plan is for: the kind, the image size and the number of planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanKey {
    pub kind: FftKind,
    pub h: usize,
    pub w: usize,
    pub planes: usize,
}

/// A cuFFT plan (destroyed on drop) and the bytes of work area it needs.
pub struct FftPlan {
    handle: fsys::cufftHandle,
    work_bytes: usize,
}

// SAFETY: a plan handle may be used from any thread; the cache's mutex serialises its use.
unsafe impl Send for FftPlan {}
unsafe impl Sync for FftPlan {}

impl Drop for FftPlan {
    fn drop(&mut self) {
        // SAFETY: the handle was made by cufftCreate and is destroyed once, here.
        let _ = unsafe { cufft::destroy(self.handle) };
    }
}

fn fft_err(op: &'static str) -> impl Fn(cufft::CufftError) -> Error {
    move |e| Error::cuda_call(op, e)
}

/// A batched 2-D plan for `key` on this GPU's stream, without a work area of its own.
fn make_plan(gpu: &Gpu, key: PlanKey) -> Result<FftPlan> {
    const OP: &str = "cuFFT plan";
    let mut n = [int(OP, key.h)?, int(OP, key.w)?];
    let batch = int(OP, key.planes)?;
    let ty = match key.kind {
        FftKind::R2C => fsys::cufftType::CUFFT_R2C,
        FftKind::C2R => fsys::cufftType::CUFFT_C2R,
        FftKind::C2C => fsys::cufftType::CUFFT_C2C,
    };
    // Owned from here, so an error below destroys the handle.
    let mut plan = FftPlan { handle: cufft::create().map_err(fft_err(OP))?, work_bytes: 0 };
    // SAFETY: a fresh handle; n points at two live ints; null embeds mean the basic contiguous
    // layout (planes of H x W reals, H x (W/2+1) or H x W complex numbers).
    unsafe {
        cufft::set_auto_allocation(plan.handle, false).map_err(fft_err(OP))?;
        plan.work_bytes =
            cufft::make_plan_many(plan.handle, 2, n.as_mut_ptr(), std::ptr::null_mut(), 1, 0, std::ptr::null_mut(), 1, 0, ty, batch).map_err(fft_err(OP))?;
        cufft::set_stream(plan.handle, gpu.stream.cu_stream() as _).map_err(fft_err(OP))?;
    }
    Ok(plan)
}

/// Runs `exec` with the plan for `key` (made on first use) and a fresh work area.
fn with_plan(gpu: &Gpu, key: PlanKey, exec: impl FnOnce(fsys::cufftHandle) -> std::result::Result<(), cufft::CufftError>) -> Result<()> {
    const OP: &str = "cuFFT plan";
    gpu.ctx.bind_to_thread().map_err(|e| Error::cuda_call(OP, e))?;
    let mut plans = gpu.ffts.lock().map_err(|_| Error::invalid(OP, "a thread panicked during an FFT"))?;
    let plan = match plans.entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(make_plan(gpu, key)?),
    };
    // SAFETY: the work area is only read and written by the transform queued below on the same
    // stream; it is freed (stream-ordered) after it.
    let work = unsafe { gpu.stream.alloc::<u8>(plan.work_bytes.max(1)) }.map_err(gpu.alloc_err(plan.work_bytes))?;
    let (ptr, _guard) = work.device_ptr(&gpu.stream);
    // SAFETY: a live plan and a device buffer at least work_bytes long.
    unsafe { cufft::set_work_area(plan.handle, ptr as *mut c_void) }.map_err(fft_err(OP))?;
    exec(plan.handle).map_err(fft_err("cuFFT exec"))
}

/// The glue kernels' geometry of a spectrum.
fn glue(op: &'static str, s: &Spectrum, adjoint: bool, norm: f32) -> Result<SpectrumGeom> {
    Ok(SpectrumGeom { planes: s.planes as i64, h: int(op, s.h)?, wh: int(op, s.w / 2 + 1)?, w: int(op, s.w)?, adjoint: adjoint as i32, norm })
}

/// y = rfft2(x) over the planes of H x W; with `adjoint_of_inverse` each column ky is then scaled
/// by c_ky / (H W). x [planes, H, W], y [planes, H, W/2+1, 2].
pub(super) fn rfft2(gpu: &Gpu, s: &Spectrum, x: &Tensor, y: &mut Tensor, adjoint_of_inverse: bool) -> Result<()> {
    let (x, y) = (x.cuda()?, y.cuda_mut()?);
    let (planes, h, w) = (s.planes, s.h, s.w);
    let wh = w / 2 + 1;
    check_len("rfft2", "x", x, planes * h * w)?;
    check_len("rfft2", "y", y, planes * h * wh * 2)?;
    if planes == 0 {
        return Ok(());
    }
    {
        let (xp, _gx) = x.device_ptr(&gpu.stream);
        let (yp, _gy) = y.device_ptr_mut(&gpu.stream);
        // SAFETY: x holds planes H W reals and y planes H (W/2+1) complex numbers, the plan's
        // layout; an out-of-place R2C transform leaves its input as it was.
        with_plan(gpu, PlanKey { kind: FftKind::R2C, h, w, planes }, |p| unsafe {
            cufft::exec_r2c(p, xp as *mut fsys::cufftReal, yp as *mut fsys::cufftComplex)
        })?;
    }
    if adjoint_of_inverse {
        let g = glue("spectrum_col_scale_f32", s, true, 1.0)?;
        let z = y;
        // SAFETY: z holds planes H Wh complex numbers.
        unsafe { kernels::spectrum_col_scale_f32(gpu, elementwise_config(planes * h * wh), z, g)? };
    }
    Ok(())
}

/// y = irfft2(z) to width w (scaled by 1 / (H W)); with `adjoint_of_forward`, H W irfft2 of z with
/// its interior columns halved (the adjoint of rfft2). z [planes, H, W/2+1, 2], y [planes, H, W];
/// z is not modified (cuFFT's C2R transform runs on a prepared copy, which it may overwrite).
pub(super) fn irfft2(gpu: &Gpu, s: &Spectrum, z: &Tensor, y: &mut Tensor, adjoint_of_forward: bool) -> Result<()> {
    let z = z.cuda()?;
    let (planes, h, w) = (s.planes, s.h, s.w);
    let wh = w / 2 + 1;
    check_len("irfft2", "z", z, planes * h * wh * 2)?;
    if planes == 0 {
        return check_len("irfft2", "y", y.cuda()?, 0);
    }
    let mut out = gpu.uninit::<f32>(planes * h * wh * 2)?;
    let g = ready_geom(s, adjoint_of_forward)?;
    // SAFETY: z and out hold planes H Wh complex numbers.
    unsafe { kernels::irfft_prep_f32(gpu, elementwise_config(planes * h * wh), z, &mut out, g)? };
    c2r_ready(gpu, s, &mut out, y)
}

/// The glue's geometry that makes a half spectrum ready for the C2R of irfft2 (or, `adjoint`, of
/// rfft2's adjoint): kernels/fft.cu's irfft_prep_f32 and the mode mix's `ready` output.
pub(crate) fn ready_geom(s: &Spectrum, adjoint: bool) -> Result<SpectrumGeom> {
    let norm: f32 = if adjoint { 1.0 } else { 1.0 / (s.h * s.w) as f32 };
    glue("irfft_prep_f32", s, adjoint, norm)
}

/// y = the C2R transform of a half spectrum already made ready (which the transform overwrites).
pub(super) fn c2r_ready(gpu: &Gpu, s: &Spectrum, ready: &mut cudarc::driver::CudaSlice<f32>, y: &mut Tensor) -> Result<()> {
    let y = y.cuda_mut()?;
    let (planes, h, w) = (s.planes, s.h, s.w);
    check_len("irfft2", "ready", ready, planes * h * (w / 2 + 1) * 2)?;
    check_len("irfft2", "y", y, planes * h * w)?;
    if planes == 0 {
        return Ok(());
    }
    let (zp, _gz) = ready.device_ptr_mut(&gpu.stream);
    let (yp, _gy) = y.device_ptr_mut(&gpu.stream);
    // SAFETY: the ready spectrum and y have the plan's layout (lengths checked above).
    with_plan(gpu, PlanKey { kind: FftKind::C2R, h, w, planes }, |p| unsafe { cufft::exec_c2r(p, zp as *mut fsys::cufftComplex, yp as *mut fsys::cufftReal) })
}

/// y = scale * FFT2(z) (inverse: unnormalised inverse) over `planes` planes of H x W complex
/// numbers; z, y [planes, H, W, 2].
#[allow(clippy::too_many_arguments)]
pub(super) fn fft2(gpu: &Gpu, z: &Tensor, y: &mut Tensor, planes: usize, h: usize, w: usize, inverse: bool, scale: f32) -> Result<()> {
    let (z, y) = (z.cuda()?, y.cuda_mut()?);
    check_len("fft2", "z", z, planes * h * w * 2)?;
    if planes == 0 {
        return Ok(());
    }
    gpu.copy_into(z, y)?;
    {
        let (yp, _gy) = y.device_ptr_mut(&gpu.stream);
        // cuFFT's CUFFT_FORWARD is -1 and CUFFT_INVERSE +1 (the sign of the exponent).
        let dir = if inverse { 1 } else { -1 };
        // SAFETY: y holds planes H W complex numbers, transformed in place.
        with_plan(gpu, PlanKey { kind: FftKind::C2C, h, w, planes }, |p| unsafe {
            cufft::exec_c2c(p, yp as *mut fsys::cufftComplex, yp as *mut fsys::cufftComplex, dir)
        })?;
    }
    if scale != 1.0 {
        scale_in_place(gpu, y, scale)?;
    }
    Ok(())
}
