//! Complex fields on the CPU, [..., H, W, 2] tensors.
//!
//! mul:   y = z p (or z conj(p)), p [H, W, 2] broadcast over the leading dimensions.
//! abs:   y = |z| (hypot); d|z|/dz = z / |z|, defined as 0 at z = 0.
//! angle: y = atan2(im, re); d arg/dz = (-im, re) / |z|^2, defined as 0 at z = 0.

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use crate::backend::cpu::{with_float, CHUNK};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

/// (H, W) of a complex field [..., H, W, 2].
fn hw(z: &Tensor) -> (usize, usize) {
    let d = z.dims();
    (d[d.len() - 3], d[d.len() - 2])
}

pub(super) fn complex_mul(z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()> {
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

pub(super) fn complex_abs(z: &Tensor, y: &mut Tensor) -> Result<()> {
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

pub(super) fn complex_abs_bwd(z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
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

pub(super) fn complex_angle(z: &Tensor, y: &mut Tensor) -> Result<()> {
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

pub(super) fn complex_angle_bwd(z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
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
