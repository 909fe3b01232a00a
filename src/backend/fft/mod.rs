//! The FFTs (kernels/fft.cu holds the spectrum glue around cuFFT on the GPU; rustfft/realfft on the
//! CPU):
//!
//! - rfft2:  X[kx, ky] = sum_{n,m} x[n, m] e^{-2 pi i (kx n / H + ky m / W)},  ky in 0..W/2+1
//!   (unnormalised), over the last two dimensions;
//! - irfft2: x[n, m] = 1/(HW) sum_{kx, ky} c_ky Re(X[kx, ky] e^{+2 pi i (...)}), c = 1 on the DC
//!   column (and the Nyquist column when W is even), 2 elsewhere: a DC or Nyquist column that is
//!   not Hermitian is taken by its Hermitian part (the same as symmetrising it first, as JAX does),
//!   a linear map of the real and imaginary parts, so its adjoint is exact;
//! - the adjoints rfft2_bwd (HW irfft2 with interior columns halved) and irfft2_bwd (rfft2 with
//!   each column times c_ky / (HW));
//! - fft2: the complex 2-D FFT of [.., H, W, 2] times a scale (unnormalised inverse).
//!
//! Geometry: the image and half-spectrum shapes ([`Spectrum`]), and on the GPU `SpectrumGeom`.

mod cpu;
pub(crate) mod cuda;

pub use super::kernels::SpectrumGeom;
use super::{check_complex, check_compute, check_spatial, compute};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// An image [.., H, W] and its half spectrum [.., H, W/2+1, 2].
pub(crate) struct Spectrum {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub image: Shape,
    pub half: Shape,
}

impl Spectrum {
    /// From an image [.., H, W].
    fn of_image(op: &'static str, x: &Tensor) -> Result<Spectrum> {
        check_compute(op, x)?;
        check_spatial(op, x)?;
        let d = x.dims();
        let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
        let mut half = d[..d.len() - 1].to_vec();
        half.extend([w / 2 + 1, 2]);
        Ok(Spectrum { planes: x.numel() / (h * w), h, w, image: x.shape().clone(), half: Shape::new(half) })
    }

    /// From a half spectrum [.., H, w/2+1, 2] of width-w images.
    fn of_half(op: &'static str, z: &Tensor, w: usize) -> Result<Spectrum> {
        check_compute(op, z)?;
        check_complex(op, z, 3)?;
        let d = z.dims();
        let wh = d[d.len() - 2];
        if w == 0 || wh != w / 2 + 1 {
            return Err(Error::bad_shape(op, z.shape(), format!("half spectrum of width {wh} cannot give width {w}")));
        }
        let h = d[d.len() - 3];
        let mut image = d[..d.len() - 2].to_vec();
        image.push(w);
        Ok(Spectrum { planes: z.numel() / (2 * h * wh).max(1), h, w, image: Shape::new(image), half: z.shape().clone() })
    }
}

/// Real image [.., H, W] -> half spectrum [.., H, W/2+1, 2], unnormalised.
pub fn rfft2(x: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("rfft2");
    let s = Spectrum::of_image("rfft2", x)?;
    compute(s.half.clone(), x, |y| cpu::rfft2(x, y, false), |gpu, y| cuda::rfft2(gpu, &s, x, y, false))
}

/// The adjoint of irfft2.
pub fn irfft2_bwd(dy: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("irfft2_bwd");
    let s = Spectrum::of_image("irfft2_bwd", dy)?;
    compute(s.half.clone(), dy, |dz| cpu::rfft2(dy, dz, true), |gpu, dz| cuda::rfft2(gpu, &s, dy, dz, true))
}

/// irfft2's adjoint as cuFFT's R2C transform leaves it, before the column scale c_ky / (H W) that
/// [`irfft2_bwd`] applies after it: made only on a GPU (by [`irfft2_bwd_unscaled`]) and read only by
/// kernels that apply the scale as they read (the mode mix's backward products), so that the
/// scale costs no launch. It names the tensor it describes and the images' width.
pub struct UnscaledSpectrum {
    of: Tensor,
    w: usize,
}

impl UnscaledSpectrum {
    /// The images' width when this describes `z` (the same storage), else None.
    pub(crate) fn width_of(&self, z: &Tensor) -> Option<usize> {
        self.of.shares_storage(z).then_some(self.w)
    }
}

/// [`irfft2_bwd`] whose column scale is left to the reader: on a GPU the R2C's spectrum and the
/// [`UnscaledSpectrum`] that says so (hand the spectrum only to a reader that takes it), elsewhere
/// the scaled spectrum and None.
pub fn irfft2_bwd_unscaled(dy: &Tensor) -> Result<(Tensor, Option<UnscaledSpectrum>)> {
    if !matches!(dy.device().kind(), crate::device::DeviceKind::Cuda(_)) {
        return Ok((irfft2_bwd(dy)?, None));
    }
    let _p = super::profile::scope("irfft2_bwd");
    let s = Spectrum::of_image("irfft2_bwd", dy)?;
    let dz =
        compute(s.half.clone(), dy, |_| Err(Error::invalid("irfft2_bwd", "an unscaled spectrum is a GPU's")), |gpu, dz| cuda::rfft2(gpu, &s, dy, dz, false))?;
    Ok((dz.clone(), Some(UnscaledSpectrum { of: dz, w: s.w })))
}

/// Half spectrum [.., H, w/2+1, 2] -> real image [.., H, w], scaled by 1/(H w).
pub fn irfft2(z: &Tensor, w: usize) -> Result<Tensor> {
    let _p = super::profile::scope("irfft2");
    let s = Spectrum::of_half("irfft2", z, w)?;
    compute(s.image.clone(), z, |y| cpu::irfft2(z, y, false), |gpu, y| cuda::irfft2(gpu, &s, z, y, false))
}

/// The adjoint of rfft2.
pub fn rfft2_bwd(dy: &Tensor, w: usize) -> Result<Tensor> {
    let _p = super::profile::scope("rfft2_bwd");
    let s = Spectrum::of_half("rfft2_bwd", dy, w)?;
    compute(s.image.clone(), dy, |dx| cpu::irfft2(dy, dx, true), |gpu, dx| cuda::irfft2(gpu, &s, dy, dx, true))
}

/// A half spectrum that a kernel made ready for cuFFT's C2R transform as it wrote the tensor `of`
/// (the glue of irfft2, or with `adjoint` that of rfft2's adjoint, applied in the same pass), so
/// that [`irfft2_ready`] and [`rfft2_bwd_ready`] run the transform without a glue launch. Only a
/// GPU's mode mix makes one (`spectral::spectral_mix_ready`, `spectral_mix_bwd_input_ready`).
pub struct ReadySpectrum {
    pub(crate) buf: cudarc::driver::CudaSlice<f32>,
    pub(crate) of: Tensor,
    pub(crate) w: usize,
    pub(crate) adjoint: bool,
}

impl ReadySpectrum {
    /// An unwritten buffer for the spectrum `of` of width-`w` images made ready, and the glue's
    /// geometry for the kernel that fills it.
    pub(crate) fn buffer(gpu: &super::gpu::Gpu, of: &Tensor, w: usize, adjoint: bool) -> Result<(cudarc::driver::CudaSlice<f32>, SpectrumGeom)> {
        let s = Spectrum::of_half(if adjoint { "rfft2_bwd" } else { "irfft2" }, of, w)?;
        Ok((gpu.uninit::<f32>(of.numel().max(1))?, cuda::ready_geom(&s, adjoint)?))
    }

    /// The transform of z from this buffer, when the buffer was made from z for this transform.
    fn transform(mut self, op: &'static str, z: &Tensor, w: usize, adjoint: bool) -> Option<Result<Tensor>> {
        (self.adjoint == adjoint && self.w == w && self.of.shares_storage(z)).then(|| self.c2r(op, z, w))
    }

    fn c2r(&mut self, op: &'static str, z: &Tensor, w: usize) -> Result<Tensor> {
        let s = Spectrum::of_half(op, z, w)?;
        compute(s.image.clone(), z, |_| Err(Error::invalid(op, "a ready spectrum is a GPU's")), |gpu, y| cuda::c2r_ready(gpu, &s, &mut self.buf, y))
    }
}

/// [`irfft2`], from the spectrum a kernel made ready as it wrote z, when `ready` is that one.
pub fn irfft2_ready(z: &Tensor, w: usize, ready: Option<ReadySpectrum>) -> Result<Tensor> {
    let _p = super::profile::scope("irfft2");
    ready.and_then(|r| r.transform("irfft2", z, w, false)).unwrap_or_else(|| irfft2(z, w))
}

/// [`rfft2_bwd`], from the spectrum a kernel made ready as it wrote dy, when `ready` is that one.
pub fn rfft2_bwd_ready(dy: &Tensor, w: usize, ready: Option<ReadySpectrum>) -> Result<Tensor> {
    let _p = super::profile::scope("rfft2_bwd");
    ready.and_then(|r| r.transform("rfft2_bwd", dy, w, true)).unwrap_or_else(|| rfft2_bwd(dy, w))
}

/// Complex 2-D FFT over dimensions (H, W) of [.., H, W, 2], times `scale` (`inverse`: the
/// unnormalised inverse).
pub fn fft2(z: &Tensor, inverse: bool, scale: f64) -> Result<Tensor> {
    let _p = super::profile::scope("fft2");
    check_compute("fft2", z)?;
    check_complex("fft2", z, 3)?;
    let d = z.dims();
    let (h, w) = (d[d.len() - 3], d[d.len() - 2]);
    let planes = z.numel() / (2 * h * w).max(1);
    compute(z.shape().clone(), z, |y| cpu::fft2(z, inverse, scale, y), |gpu, y| cuda::fft2(gpu, z, y, planes, h, w, inverse, scale as f32))
}
