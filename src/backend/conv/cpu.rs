//! conv2d on the CPU: im2col + GEMM per sample.
//!
//! Forward:  y_b [C_out, Ho*Wo] = W [C_out, K] @ cols(x_b) [K, Ho*Wo], K = C_in*kh*kw (the bias is
//!           added after, by the layout family).
//! dX:       col2im(W^T @ dy_b).
//! dW:       sum over b of dy_b @ cols(x_b)^T: in order within fixed groups of samples, then the
//!           groups' sums in order (the same on any number of threads).
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

/// The output columns `ow` whose input column `ow * stride + j - pad` lies inside a row of `w`
/// (an empty range when none does).
#[inline]
fn valid_cols(g: &Geom, j: usize, w: usize) -> std::ops::Range<usize> {
    let first = g.pad.saturating_sub(j).div_ceil(g.stride);
    // ow * stride + j - pad <= w - 1  <=>  ow <= (w - 1 + pad - j) / stride
    let end = if w + g.pad > j { ((w - 1 + g.pad - j) / g.stride + 1).min(g.wo) } else { 0 };
    first.min(end)..end
}

/// cols [K, Ho*Wo] of one sample x [C, H, W], written whole (no fill beforehand needed).
fn im2col<T: Float>(g: &Geom, x: &[T], cols: &mut [T]) {
    let hw = g.plane_out();
    for (r, row) in cols.chunks_mut(hw).enumerate().take(g.k()) {
        let (c, t) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
        let (i, j) = (t / g.kw, t % g.kw);
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        let valid = valid_cols(g, j, g.w);
        for oh in 0..g.ho {
            let out = &mut row[oh * g.wo..(oh + 1) * g.wo];
            let Some(ih) = g.src(oh, i, g.h) else {
                out.fill(T::zero());
                continue;
            };
            out[..valid.start].fill(T::zero());
            out[valid.end..].fill(T::zero());
            let xr = &xc[ih * g.w..(ih + 1) * g.w];
            if g.stride == 1 {
                let s = valid.start + j - g.pad;
                out[valid.clone()].copy_from_slice(&xr[s..s + valid.len()]);
            } else {
                for ow in valid.clone() {
                    out[ow] = xr[ow * g.stride + j - g.pad];
                }
            }
        }
    }
}

/// dx [C, H, W] = scatter-add of cols [K, Ho*Wo], taps in order.
fn col2im<T: Float>(g: &Geom, cols: &[T], dx: &mut [T]) {
    let hw = g.plane_out();
    let taps = g.kh * g.kw;
    for (c, dxc) in dx.chunks_mut(g.h * g.w).enumerate() {
        dxc.fill(T::zero());
        for t in 0..taps {
            let (i, j) = (t / g.kw, t % g.kw);
            let row = &cols[(c * taps + t) * hw..(c * taps + t + 1) * hw];
            let valid = valid_cols(g, j, g.w);
            for oh in 0..g.ho {
                let Some(ih) = g.src(oh, i, g.h) else { continue };
                let dr = &mut dxc[ih * g.w..(ih + 1) * g.w];
                let src = &row[oh * g.wo..(oh + 1) * g.wo];
                for ow in valid.clone() {
                    dr[ow * g.stride + j - g.pad] += src[ow];
                }
            }
        }
    }
}

/// Samples a task of the weight gradient sums (in order) before the groups' sums are added (in
/// order): a fixed number, so that dW is the same on any number of threads.
const DW_GROUP: usize = 4;

// The batch is split across rayon's threads, one sample per task (each sample's GEMM runs on its
// task's thread: matrixmultiply's own threading is off, so the two pools never compete).

pub(super) fn conv2d_fwd(g: &ConvGeom, x: &Tensor, w: &Tensor, y: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = w.dims()[0];
    with_float!(x.dtype(), "conv2d_fwd", |T| {
        let (xs, ws) = (x.as_slice::<T>()?, w.as_slice::<T>()?);
        let ys = y.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let scratch = if g.is_pointwise() { 0 } else { g.k() * hw };
        ys.par_chunks_mut(c_out * hw).zip(xs.par_chunks(g.plane_in())).try_for_each_init(
            || vec![T::zero(); scratch],
            |cols, (yb, xb)| {
                let cols_b: &[T] = if g.is_pointwise() {
                    xb
                } else {
                    im2col(&g, xb, cols);
                    cols
                };
                gemm(Mat::new(ws, c_out, g.k()), Mat::new(cols_b, g.k(), hw), yb, T::zero())
            },
        )
    })
}

pub(super) fn conv2d_bwd_input(g: &ConvGeom, dy: &Tensor, w: &Tensor, dx: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = w.dims()[0];
    with_float!(dy.dtype(), "conv2d_bwd_input", |T| {
        let (dys, ws) = (dy.as_slice::<T>()?, w.as_slice::<T>()?);
        let dxs = dx.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let scratch = if g.is_pointwise() { 0 } else { g.k() * hw };
        dxs.par_chunks_mut(g.plane_in()).zip(dys.par_chunks(c_out * hw)).try_for_each_init(
            || vec![T::zero(); scratch],
            |dcols, (dxb, dyb)| {
                let wt = Mat::new(ws, c_out, g.k()).t();
                if g.is_pointwise() {
                    gemm(wt, Mat::new(dyb, c_out, hw), dxb, T::zero())
                } else {
                    gemm(wt, Mat::new(dyb, c_out, hw), dcols, T::zero())?;
                    col2im(&g, dcols, dxb);
                    Ok(())
                }
            },
        )
    })
}

pub(super) fn conv2d_bwd_weight(g: &ConvGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = dw.dims()[0];
    with_float!(x.dtype(), "conv2d_bwd_weight", |T| {
        let (xs, dys) = (x.as_slice::<T>()?, dy.as_slice::<T>()?);
        let dws = dw.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let scratch = if g.is_pointwise() { 0 } else { g.k() * hw };
        let (xin, yout) = (g.plane_in(), c_out * hw);
        let sum_group = |xg: &[T], dyg: &[T], out: &mut [T], cols: &mut Vec<T>| -> Result<()> {
            for (n, (xb, dyb)) in xg.chunks(xin).zip(dyg.chunks(yout)).enumerate() {
                let cols_b: &[T] = if g.is_pointwise() {
                    xb
                } else {
                    im2col(&g, xb, cols);
                    cols
                };
                let beta = if n == 0 { T::zero() } else { T::one() };
                gemm(Mat::new(dyb, c_out, hw), Mat::new(cols_b, g.k(), hw).t(), out, beta)?;
            }
            Ok(())
        };
        let groups = xs.len().div_ceil(DW_GROUP * xin);
        if groups <= 1 {
            return sum_group(xs, dys, dws, &mut vec![T::zero(); scratch]);
        }
        let mut partial = vec![T::zero(); groups * dws.len()];
        partial
            .par_chunks_mut(dws.len())
            .zip(xs.par_chunks(DW_GROUP * xin).zip(dys.par_chunks(DW_GROUP * yout)))
            .try_for_each_init(|| vec![T::zero(); scratch], |cols, (out, (xg, dyg))| sum_group(xg, dyg, out, cols))?;
        let (first, rest) = partial.split_at(dws.len());
        dws.copy_from_slice(first);
        for p in rest.chunks(dws.len()) {
            for (d, v) in dws.iter_mut().zip(p) {
                *d += *v;
            }
        }
        Ok(())
    })
}
