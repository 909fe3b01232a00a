//! conv2d on the CPU: im2col + GEMM per sample.
//!
//! Forward:  y_b [C_out, Ho*Wo] = W [C_out, K] @ cols(x_b) [K, Ho*Wo] (+ bias), K = C_in*kh*kw.
//! dX:       col2im(W^T @ dy_b).
//! dW:       sum over b, in order, of dy_b @ cols(x_b)^T.
//! A 1x1 kernel with stride 1 and no padding uses x_b itself as its columns.

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{gemm, with_float, Float, Mat};
use crate::backend::Conv2dParams;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Sizes of one convolution: input [c, h, w], kernel kh x kw, output ho x wo.
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
    fn new(x_dims: &[usize], w_dims: &[usize], out_dims: &[usize], p: Conv2dParams) -> Geom {
        Geom { c: x_dims[1], h: x_dims[2], w: x_dims[3], kh: w_dims[2], kw: w_dims[3], ho: out_dims[2], wo: out_dims[3], stride: p.stride, pad: p.padding }
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

pub(super) fn conv2d_fwd(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams, y: &mut Tensor) -> Result<()> {
    let g = Geom::new(x.dims(), w.dims(), y.dims(), p);
    let (batch, c_out) = (x.dims()[0], w.dims()[0]);
    with_float!(x.dtype(), "conv2d_fwd", |T| {
        let (xs, ws) = (x.as_slice::<T>()?, w.as_slice::<T>()?);
        let bias = b.map(|b| b.as_slice::<T>()).transpose()?;
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
            if let Some(bias) = bias {
                yb.par_chunks_mut(hw.max(1)).zip(bias.par_iter()).for_each(|(plane, &bv)| plane.iter_mut().for_each(|v| *v += bv));
            }
        }
        Ok(())
    })
}

pub(super) fn conv2d_bwd_input(dy: &Tensor, w: &Tensor, p: Conv2dParams, dx: &mut Tensor) -> Result<()> {
    let g = Geom::new(dx.dims(), w.dims(), dy.dims(), p);
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

pub(super) fn conv2d_bwd_weight(x: &Tensor, dy: &Tensor, p: Conv2dParams, dw: &mut Tensor) -> Result<()> {
    let g = Geom::new(x.dims(), dw.dims(), dy.dims(), p);
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
