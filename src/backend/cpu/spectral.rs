//! Spectral convolution pieces on the CPU: the real 2-D FFT pair and the complex mode mix.
//!
//! rfft2:  X[kx, ky] = sum_{n,m} x[n, m] e^{-2 pi i (kx n / H + ky m / W)},  ky in 0..W/2+1.
//!         Rows by a real FFT (realfft), then columns by a complex FFT (rustfft).
//! irfft2: x[n, m] = 1/(HW) sum_{kx, ky} c_ky Re(X[kx, ky] e^{+2 pi i (...)}), c = 1 on the DC
//!         column (and the Nyquist column when W is even), 2 elsewhere. Columns by a complex
//!         inverse FFT, then rows by a complex-to-real FFT whose DC/Nyquist imaginary parts are
//!         zeroed first. For a non-Hermitian DC/Nyquist column this equals symmetrising the column
//!         (JAX's choice) and it is a linear map of the real and imaginary parts, so its adjoint is
//!         exact: rfft2's adjoint is HW * irfft2 of the spectrum with interior columns halved, and
//!         irfft2's adjoint is rfft2 with each column times c_ky / (HW).
//!
//! mix:    Y[b, o, r, c] = sum_i X[b, i, row_r, c] W[i, o, r, c] on the kept rows and the first M_y
//!         columns, zero elsewhere; dX = sum_o dY conj(W); dW = sum_b conj(X) dY (in batch order).

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use std::sync::Arc;

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{num_complex::Complex, Fft, FftPlanner};

use super::{with_float, Float};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

fn fft_err(op: &'static str) -> impl Fn(realfft::FftError) -> Error {
    move |e| Error::Fft { op, why: e.to_string() }
}

/// Column weight c_ky of the half spectrum of a width-w image.
fn hermitian_weight(ky: usize, w: usize) -> f64 {
    if ky == 0 || (w % 2 == 0 && ky == w / 2) {
        1.0
    } else {
        2.0
    }
}

struct Plans<T: Float> {
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
    col_fwd: Arc<dyn Fft<T>>,
    col_inv: Arc<dyn Fft<T>>,
}

impl<T: Float> Plans<T> {
    fn new(h: usize, w: usize) -> Self {
        let mut rp = RealFftPlanner::<T>::new();
        let mut cp = FftPlanner::<T>::new();
        Plans { r2c: rp.plan_fft_forward(w), c2r: rp.plan_fft_inverse(w), col_fwd: cp.plan_fft_forward(h), col_inv: cp.plan_fft_inverse(h) }
    }
}

/// Per-thread buffers for one plane.
struct Work<T> {
    spec: Vec<Complex<T>>,
    row: Vec<T>,
    col: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
}

impl<T: Float> Work<T> {
    fn new(h: usize, w: usize, plans: &Plans<T>) -> Self {
        let wh = w / 2 + 1;
        let s = plans
            .r2c
            .get_scratch_len()
            .max(plans.c2r.get_scratch_len())
            .max(plans.col_fwd.get_inplace_scratch_len())
            .max(plans.col_inv.get_inplace_scratch_len());
        Work { spec: vec![Complex::default(); h * wh], row: vec![T::zero(); w], col: vec![Complex::default(); h], scratch: vec![Complex::default(); s] }
    }
}

/// Runs `fft` over every column of `spec` [h, wh].
fn columns<T: Float>(fft: &dyn Fft<T>, work: &mut Work<T>, h: usize, wh: usize) {
    for c in 0..wh {
        for r in 0..h {
            work.col[r] = work.spec[r * wh + c];
        }
        fft.process_with_scratch(&mut work.col, &mut work.scratch);
        for r in 0..h {
            work.spec[r * wh + c] = work.col[r];
        }
    }
}

/// y = rfft2(x) over the last two dimensions; with `adjoint_of_inverse`, each column is then
/// multiplied by c_ky / (HW) (the adjoint of irfft2).
pub(super) fn rfft2(x: &Tensor, y: &mut Tensor, adjoint_of_inverse: bool) -> Result<()> {
    let d = x.dims();
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    let wh = w / 2 + 1;
    with_float!(x.dtype(), "rfft2", |T| {
        let plans = Plans::<T>::new(h, w);
        let xs = x.as_slice::<T>()?;
        let ys = y.as_mut_slice::<T>()?;
        ys.par_chunks_mut(h * wh * 2).zip(xs.par_chunks(h * w)).try_for_each_init(
            || Work::new(h, w, &plans),
            |work, (yp, xp)| -> Result<()> {
                for r in 0..h {
                    work.row.copy_from_slice(&xp[r * w..(r + 1) * w]);
                    plans.r2c.process_with_scratch(&mut work.row, &mut work.spec[r * wh..(r + 1) * wh], &mut work.scratch).map_err(fft_err("rfft2"))?;
                }
                columns(plans.col_fwd.as_ref(), work, h, wh);
                for (i, z) in work.spec.iter().enumerate() {
                    let s = if adjoint_of_inverse { T::of_f64(hermitian_weight(i % wh, w) / (h * w) as f64) } else { T::one() };
                    yp[2 * i] = z.re * s;
                    yp[2 * i + 1] = z.im * s;
                }
                Ok(())
            },
        )
    })
}

/// y = irfft2(z) to width y.dims().last(); with `adjoint_of_forward`, y = HW irfft2(z') where z'
/// has its interior columns halved (the adjoint of rfft2).
pub(super) fn irfft2(z: &Tensor, y: &mut Tensor, adjoint_of_forward: bool) -> Result<()> {
    let d = y.dims();
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    let wh = w / 2 + 1;
    with_float!(z.dtype(), "irfft2", |T| {
        let plans = Plans::<T>::new(h, w);
        let zs = z.as_slice::<T>()?;
        let ys = y.as_mut_slice::<T>()?;
        let norm = if adjoint_of_forward { 1.0 } else { 1.0 / (h * w) as f64 };
        ys.par_chunks_mut(h * w).zip(zs.par_chunks(h * wh * 2)).try_for_each_init(
            || Work::new(h, w, &plans),
            |work, (yp, zp)| -> Result<()> {
                for (i, s) in work.spec.iter_mut().enumerate() {
                    let k = if adjoint_of_forward { 1.0 / hermitian_weight(i % wh, w) } else { 1.0 };
                    let k = T::of_f64(k * norm);
                    *s = Complex::new(zp[2 * i] * k, zp[2 * i + 1] * k);
                }
                columns(plans.col_inv.as_ref(), work, h, wh);
                for r in 0..h {
                    let row = &mut work.spec[r * wh..(r + 1) * wh];
                    // c2r reads only the real part of the DC and Nyquist bins.
                    row[0].im = T::zero();
                    if w % 2 == 0 {
                        row[wh - 1].im = T::zero();
                    }
                    plans.c2r.process_with_scratch(row, &mut yp[r * w..(r + 1) * w], &mut work.scratch).map_err(fft_err("irfft2"))?;
                }
                Ok(())
            },
        )
    })
}

#[inline]
fn cmul<T: Float>(a: (T, T), b: (T, T)) -> (T, T) {
    (a.0 * b.0 - a.1 * b.1, a.0 * b.1 + a.1 * b.0)
}

/// Sizes of a spectral mix: spectra [B, C_x, H, Wh, 2], weight [Ci, Co, R, My, 2].
struct MixDims {
    h: usize,
    wh: usize,
    ci: usize,
    co: usize,
    r: usize,
    my: usize,
}

impl MixDims {
    fn new(spec: &[usize], w: &[usize]) -> Self {
        MixDims { h: spec[2], wh: spec[3], ci: w[0], co: w[1], r: w[2], my: w[3] }
    }
    fn plane(&self) -> usize {
        self.h * self.wh * 2
    }
    /// Index (of the re part) of mode (row, col) inside a spectrum plane.
    fn at(&self, row: usize, c: usize) -> usize {
        2 * (row * self.wh + c)
    }
    /// Index (of the re part) of W[i, o, r, c].
    fn w_at(&self, i: usize, o: usize, r: usize, c: usize) -> usize {
        2 * (((i * self.co + o) * self.r + r) * self.my + c)
    }
}

pub(super) fn mix_fwd(xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), w.dims());
    with_float!(xh.dtype(), "spectral_mix_fwd", |T| {
        let (xs, ws) = (xh.as_slice::<T>()?, w.as_slice::<T>()?);
        let plane = m.plane();
        // One task per (b, o) output plane.
        y.as_mut_slice::<T>()?.par_chunks_mut(plane).enumerate().for_each(|(bo, yp)| {
            let (b, o) = (bo / m.co, bo % m.co);
            for i in 0..m.ci {
                let xp = &xs[(b * m.ci + i) * plane..(b * m.ci + i + 1) * plane];
                for (r, &row) in rows.iter().enumerate() {
                    for c in 0..m.my {
                        let (xi, wi) = (m.at(row, c), m.w_at(i, o, r, c));
                        let p = cmul((xp[xi], xp[xi + 1]), (ws[wi], ws[wi + 1]));
                        yp[xi] += p.0;
                        yp[xi + 1] += p.1;
                    }
                }
            }
        });
        Ok(())
    })
}

pub(super) fn mix_bwd_input(dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()> {
    let m = MixDims::new(dyh.dims(), w.dims());
    with_float!(dyh.dtype(), "spectral_mix_bwd_input", |T| {
        let (dys, ws) = (dyh.as_slice::<T>()?, w.as_slice::<T>()?);
        let plane = m.plane();
        // One task per (b, i) input-gradient plane.
        dxh.as_mut_slice::<T>()?.par_chunks_mut(plane).enumerate().for_each(|(bi, dxp)| {
            let (b, i) = (bi / m.ci, bi % m.ci);
            for o in 0..m.co {
                let dyp = &dys[(b * m.co + o) * plane..(b * m.co + o + 1) * plane];
                for (r, &row) in rows.iter().enumerate() {
                    for c in 0..m.my {
                        let (yi, wi) = (m.at(row, c), m.w_at(i, o, r, c));
                        let p = cmul((dyp[yi], dyp[yi + 1]), (ws[wi], -ws[wi + 1]));
                        dxp[yi] += p.0;
                        dxp[yi + 1] += p.1;
                    }
                }
            }
        });
        Ok(())
    })
}

pub(super) fn mix_bwd_weight(xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), dw.dims());
    let batch = xh.dims()[0];
    with_float!(xh.dtype(), "spectral_mix_bwd_weight", |T| {
        let (xs, dys) = (xh.as_slice::<T>()?, dyh.as_slice::<T>()?);
        let plane = m.plane();
        let per_io = m.r * m.my * 2;
        // One task per (i, o) weight block; the batch is summed in order inside it.
        dw.as_mut_slice::<T>()?.par_chunks_mut(per_io).enumerate().for_each(|(io, dwb)| {
            let (i, o) = (io / m.co, io % m.co);
            for b in 0..batch {
                let xp = &xs[(b * m.ci + i) * plane..(b * m.ci + i + 1) * plane];
                let dyp = &dys[(b * m.co + o) * plane..(b * m.co + o + 1) * plane];
                for (r, &row) in rows.iter().enumerate() {
                    for c in 0..m.my {
                        let k = m.at(row, c);
                        let p = cmul((xp[k], -xp[k + 1]), (dyp[k], dyp[k + 1]));
                        let j = 2 * (r * m.my + c);
                        dwb[j] += p.0;
                        dwb[j + 1] += p.1;
                    }
                }
            }
        });
        Ok(())
    })
}
