//! Complex-field kernels of the physics forward model, on [..., H, W, 2] tensors.
//!
//! mul:   y = z p (or z conj(p)), p [H, W, 2] broadcast over the leading dimensions.
//! fft2:  y = scale * FFT2(z) (or the unnormalised inverse), rows then columns (rustfft).
//! roll:  y[(i + sh) % H, (j + sw) % W] = x[i, j]; fftshift is roll by (H/2, W/2).
//! abs:   y = |z| (hypot); d|z|/dz = z / |z|, defined as 0 at z = 0.
//! angle: y = atan2(im, re); d arg/dz = (-im, re) / |z|^2, defined as 0 at z = 0.
//! pack:  [B, 2C, S] (real channels, then imaginary) <-> [B, C, S, 2].

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;
use rustfft::{num_complex::Complex, FftPlanner};

use super::{bcs, with_float, CHUNK};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// (H, W) of a complex field [..., H, W, 2].
fn hw(z: &Tensor) -> (usize, usize) {
    let d = z.dims();
    (d[d.len() - 3], d[d.len() - 2])
}

pub(super) fn mul(z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()> {
    let (h, w) = hw(z);
    let plane = 2 * h * w;
    with_float!(z.dtype(), "complex_mul", |T| {
        let (zs, ps) = (z.as_slice::<T>()?, p.as_slice::<T>()?);
        let sign = if conj { -T::one() } else { T::one() };
        if plane == 0 {
            return Ok(());
        }
        y.as_mut_slice::<T>()?.par_chunks_mut(plane).zip(zs.par_chunks(plane)).for_each(|(yp, zp)| {
            for k in 0..h * w {
                let (a, b) = (zp[2 * k], zp[2 * k + 1]);
                let (c, d) = (ps[2 * k], sign * ps[2 * k + 1]);
                yp[2 * k] = a * c - b * d;
                yp[2 * k + 1] = a * d + b * c;
            }
        });
        Ok(())
    })
}

pub(super) fn fft2(z: &Tensor, inverse: bool, scale: f64, y: &mut Tensor) -> Result<()> {
    let (h, w) = hw(z);
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

pub(super) fn roll2d(x: &Tensor, sh: usize, sw: usize, complex: bool, y: &mut Tensor) -> Result<()> {
    let d = x.dims();
    let inner = if complex { 2 } else { 1 };
    let r = d.len() - if complex { 1 } else { 0 };
    let (h, w) = (d[r - 2], d[r - 1]);
    let plane = h * w * inner;
    with_float!(x.dtype(), "roll2d", |T| {
        let xs = x.as_slice::<T>()?;
        if plane == 0 {
            return Ok(());
        }
        y.as_mut_slice::<T>()?.par_chunks_mut(plane).zip(xs.par_chunks(plane)).for_each(|(yp, xp)| {
            for i in 0..h {
                let oi = (i + sh) % h;
                for j in 0..w {
                    let oj = (j + sw) % w;
                    let (src, dst) = ((i * w + j) * inner, (oi * w + oj) * inner);
                    yp[dst..dst + inner].copy_from_slice(&xp[src..src + inner]);
                }
            }
        });
        Ok(())
    })
}

pub(super) fn abs(z: &Tensor, y: &mut Tensor) -> Result<()> {
    with_float!(z.dtype(), "complex_abs", |T| {
        let zs = z.as_slice::<T>()?;
        y.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(zs.par_chunks(2 * CHUNK)).for_each(|(yc, zc)| {
            for (k, v) in yc.iter_mut().enumerate() {
                *v = zc[2 * k].hypot(zc[2 * k + 1]);
            }
        });
        Ok(())
    })
}

pub(super) fn abs_bwd(z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
    with_float!(z.dtype(), "complex_abs_bwd", |T| {
        let (zs, dys) = (z.as_slice::<T>()?, dy.as_slice::<T>()?);
        dz.as_mut_slice::<T>()?.par_chunks_mut(2 * CHUNK).zip(zs.par_chunks(2 * CHUNK).zip(dys.par_chunks(CHUNK))).for_each(|(dzc, (zc, dyc))| {
            for (k, &g) in dyc.iter().enumerate() {
                let (re, im) = (zc[2 * k], zc[2 * k + 1]);
                let m = re.hypot(im);
                if m > T::zero() {
                    dzc[2 * k] = g * re / m;
                    dzc[2 * k + 1] = g * im / m;
                } else {
                    dzc[2 * k] = T::zero();
                    dzc[2 * k + 1] = T::zero();
                }
            }
        });
        Ok(())
    })
}

pub(super) fn angle(z: &Tensor, y: &mut Tensor) -> Result<()> {
    with_float!(z.dtype(), "complex_angle", |T| {
        let zs = z.as_slice::<T>()?;
        y.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(zs.par_chunks(2 * CHUNK)).for_each(|(yc, zc)| {
            for (k, v) in yc.iter_mut().enumerate() {
                *v = zc[2 * k + 1].atan2(zc[2 * k]);
            }
        });
        Ok(())
    })
}

pub(super) fn angle_bwd(z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
    with_float!(z.dtype(), "complex_angle_bwd", |T| {
        let (zs, dys) = (z.as_slice::<T>()?, dy.as_slice::<T>()?);
        dz.as_mut_slice::<T>()?.par_chunks_mut(2 * CHUNK).zip(zs.par_chunks(2 * CHUNK).zip(dys.par_chunks(CHUNK))).for_each(|(dzc, (zc, dyc))| {
            for (k, &g) in dyc.iter().enumerate() {
                let (re, im) = (zc[2 * k], zc[2 * k + 1]);
                let m2 = re * re + im * im;
                if m2 > T::zero() {
                    dzc[2 * k] = -g * im / m2;
                    dzc[2 * k + 1] = g * re / m2;
                } else {
                    dzc[2 * k] = T::zero();
                    dzc[2 * k + 1] = T::zero();
                }
            }
        });
        Ok(())
    })
}

pub(super) fn pack(x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()> {
    // Sizes of the channel form [B, 2C, S].
    let (b, c2, s) = if unpack { bcs(y) } else { bcs(x) };
    let c = c2 / 2;
    with_float!(x.dtype(), "pack_complex", |T| {
        let xs = x.as_slice::<T>()?;
        let ys = y.as_mut_slice::<T>()?;
        for n in 0..b {
            for ch in 0..c {
                let re = (n * c2 + ch) * s;
                let im = (n * c2 + c + ch) * s;
                let z = (n * c + ch) * s * 2;
                for k in 0..s {
                    if unpack {
                        ys[re + k] = xs[z + 2 * k];
                        ys[im + k] = xs[z + 2 * k + 1];
                    } else {
                        ys[z + 2 * k] = xs[re + k];
                        ys[z + 2 * k + 1] = xs[im + k];
                    }
                }
            }
        }
        Ok(())
    })
}
