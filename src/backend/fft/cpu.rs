//! The FFTs on the CPU: rows by a real FFT (realfft), columns by a complex FFT (rustfft); irfft2
//! runs the columns' inverse first, then a complex-to-real FFT of each row whose DC and Nyquist
//! imaginary parts are zeroed (the Hermitian part of those columns). One plane per task.

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use std::sync::Arc;

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{num_complex::Complex, Fft, FftPlanner};

use crate::backend::cpu::{with_float, Float};
use crate::error::{Error, Result};
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

fn fft_err(op: &'static str) -> impl Fn(realfft::FftError) -> Error {
    move |e| Error::Fft { op, why: e.to_string() }
}

/// Column weight c_ky of the half spectrum of a width-w image.
fn hermitian_weight(ky: usize, w: usize) -> f64 {
    if ky == 0 || (w.is_multiple_of(2) && ky == w / 2) {
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

pub(super) fn fft2(z: &Tensor, inverse: bool, scale: f64, y: &mut Tensor) -> Result<()> {
    let d = z.dims();
    let (h, w) = (d[d.len() - 3], d[d.len() - 2]);
    let plane = 2 * h * w;
    with_float!(z.dtype(), "fft2", |T| {
        let mut planner = FftPlanner::<T>::new();
        let (row, col) =
            if inverse { (planner.plan_fft_inverse(w), planner.plan_fft_inverse(h)) } else { (planner.plan_fft_forward(w), planner.plan_fft_forward(h)) };
        let zs = z.as_slice::<T>()?;
        let s = T::of_f64(scale);
        if plane == 0 {
            return Ok(());
        }
        y.as_mut_slice::<T>()?.par_chunks_mut(plane).zip(zs.par_chunks(plane)).for_each_init(
            || {
                let n = row.get_inplace_scratch_len().max(col.get_inplace_scratch_len());
                (vec![Complex::<T>::default(); h * w], vec![Complex::<T>::default(); h], vec![Complex::<T>::default(); n])
            },
            |(buf, colbuf, scratch), (yp, zp)| {
                for (k, v) in buf.iter_mut().enumerate() {
                    *v = Complex::new(zp[2 * k], zp[2 * k + 1]);
                }
                for r in 0..h {
                    row.process_with_scratch(&mut buf[r * w..(r + 1) * w], scratch);
                }
                for c in 0..w {
                    for r in 0..h {
                        colbuf[r] = buf[r * w + c];
                    }
                    col.process_with_scratch(colbuf, scratch);
                    for r in 0..h {
                        buf[r * w + c] = colbuf[r];
                    }
                }
                for (k, v) in buf.iter().enumerate() {
                    yp[2 * k] = v.re * s;
                    yp[2 * k + 1] = v.im * s;
                }
            },
        );
        Ok(())
    })
}
