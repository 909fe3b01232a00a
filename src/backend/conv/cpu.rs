//! conv2d on the CPU: im2col + GEMM per sample.
//!
//! Forward:  y_b [C_out, Ho*Wo] = W [C_out, K] @ cols(x_b) [K, Ho*Wo], K = C_in*kh*kw (the bias is
//!           added after, by the layout family).
//! dX:       col2im(W^T @ dy_b).
//! dW:       sum over b, in order, of dy_b @ cols(x_b)^T.
//! A 1x1 kernel with stride 1 and no padding uses x_b itself as its columns.

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::ConvGeom;
use crate::backend::cpu::{gemm, with_float, Float, Mat};
use crate::error::Result;
use crate::tensor::Tensor;

/// Sizes of one convolution as the CPU indexes them: input [c, h, w], kernel kh x kw, output
/// ho x wo.
#[derive(Clone, Copy)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    fn new(g: &ConvGeom) -> Geom {
        let u = |v: i32| v as usize;
        Geom { c: u(g.c), h: u(g.h), w: u(g.w), kh: u(g.kh), kw: u(g.kw), ho: u(g.ho), wo: u(g.wo), stride: u(g.stride), pad: u(g.pad) }
    }
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn plane_out(&self) -> usize {
        self.ho * self.wo
    }
    fn plane_in(&self) -> usize {
        self.c * self.h * self.w
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Input coordinate of output index `o` and kernel tap `t`, if inside the map.
    #[inline]
    fn src(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        (o * self.stride + t).checked_sub(self.pad).filter(|&v| v < size)
    }
}

/// cols [K, Ho*Wo] of one sample x [C, H, W].
fn im2col<T: Float>(g: &Geom, x: &[T], cols: &mut [T]) {
    let hw = g.plane_out();
    cols.par_chunks_mut(hw).enumerate().for_each(|(r, row)| {
        let (c, t) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
        let (i, j) = (t / g.kw, t % g.kw);
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for oh in 0..g.ho {
            let out = &mut row[oh * g.wo..(oh + 1) * g.wo];
            match g.src(oh, i, g.h) {
                None => out.fill(T::zero()),
                Some(ih) => {
                    for (ow, v) in out.iter_mut().enumerate() {
                        *v = g.src(ow, j, g.w).map_or(T::zero(), |iw| xc[ih * g.w + iw]);
                    }
                }
            }
        }
    });
}

/// dx [C, H, W] = scatter-add of cols [K, Ho*Wo]; one channel per task, taps in order.
fn col2im<T: Float>(g: &Geom, cols: &[T], dx: &mut [T]) {
    let hw = g.plane_out();
    let taps = g.kh * g.kw;
    dx.par_chunks_mut(g.h * g.w).enumerate().for_each(|(c, dxc)| {
        dxc.fill(T::zero());
        for t in 0..taps {
            let (i, j) = (t / g.kw, t % g.kw);
            let row = &cols[(c * taps + t) * hw..(c * taps + t + 1) * hw];
            for oh in 0..g.ho {
                let Some(ih) = g.src(oh, i, g.h) else { continue };
                for ow in 0..g.wo {
                    if let Some(iw) = g.src(ow, j, g.w) {
                        let v = &mut dxc[ih * g.w + iw];
                        *v += row[oh * g.wo + ow];
                    }
                }
            }
        }
    });
}

pub(super) fn conv2d_fwd(g: &ConvGeom, x: &Tensor, w: &Tensor, y: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let (batch, c_out) = (x.dims()[0], w.dims()[0]);
    with_float!(x.dtype(), "conv2d_fwd", |T| {
        let (xs, ws) = (x.as_slice::<T>()?, w.as_slice::<T>()?);
        let ys = y.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let mut cols = vec![T::zero(); if g.is_pointwise() { 0 } else { g.k() * hw }];
        for n in 0..batch {
            let xb = &xs[n * g.plane_in()..(n + 1) * g.plane_in()];
            let yb = &mut ys[n * c_out * hw..(n + 1) * c_out * hw];
            let cols_b: &[T] = if g.is_pointwise() {
                xb
            } else {
                im2col(&g, xb, &mut cols);
                &cols
            };
            gemm(Mat::new(ws, c_out, g.k()), Mat::new(cols_b, g.k(), hw), yb, T::zero())?;
        }
        Ok(())
    })
}

pub(super) fn conv2d_bwd_input(g: &ConvGeom, dy: &Tensor, w: &Tensor, dx: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let (batch, c_out) = (dy.dims()[0], w.dims()[0]);
    with_float!(dy.dtype(), "conv2d_bwd_input", |T| {
        let (dys, ws) = (dy.as_slice::<T>()?, w.as_slice::<T>()?);
        let dxs = dx.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let mut dcols = vec![T::zero(); if g.is_pointwise() { 0 } else { g.k() * hw }];
        for n in 0..batch {
            let dyb = &dys[n * c_out * hw..(n + 1) * c_out * hw];
            let dxb = &mut dxs[n * g.plane_in()..(n + 1) * g.plane_in()];
            let wt = Mat::new(ws, c_out, g.k()).t();
            if g.is_pointwise() {
                gemm(wt, Mat::new(dyb, c_out, hw), dxb, T::zero())?;
            } else {
                gemm(wt, Mat::new(dyb, c_out, hw), &mut dcols, T::zero())?;
                col2im(&g, &dcols, dxb);
            }
        }
        Ok(())
    })
}

pub(super) fn conv2d_bwd_weight(g: &ConvGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let (batch, c_out) = (x.dims()[0], dw.dims()[0]);
    with_float!(x.dtype(), "conv2d_bwd_weight", |T| {
        let (xs, dys) = (x.as_slice::<T>()?, dy.as_slice::<T>()?);
        let dws = dw.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let mut cols = vec![T::zero(); if g.is_pointwise() { 0 } else { g.k() * hw }];
        for n in 0..batch {
            let xb = &xs[n * g.plane_in()..(n + 1) * g.plane_in()];
            let dyb = &dys[n * c_out * hw..(n + 1) * c_out * hw];
            let cols_b: &[T] = if g.is_pointwise() {
                xb
            } else {
                im2col(&g, xb, &mut cols);
                &cols
            };
            let beta = if n == 0 { T::zero() } else { T::one() };
            gemm(Mat::new(dyb, c_out, hw), Mat::new(cols_b, g.k(), hw).t(), dws, beta)?;
        }
        Ok(())
    })
}
