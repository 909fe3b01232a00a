//! The spectral mode mix on the CPU: per kept mode (row, col), one complex GEMM over the batch
//! (forward: Y[B, Co] = X[B, Ci] W[Ci, Co]; dX[B, Ci] = dY[B, Co] conj(W)^T; dW[Ci, Co] =
//! conj(X)^T[Ci, B] dY[B, Co]), each as four real GEMMs on strided views of the interleaved
//! (re, im) data, so nothing is copied or conjugated beforehand. The modes run in parallel: each
//! writes only its own entries, with a fixed sequence of GEMMs, so the result does not depend on
//! the number of threads.

use rayon::prelude::*;

use crate::backend::cpu::{with_float, Float};
use crate::error::Result;
use crate::tensor::Tensor;

/// Sizes of a spectral mix: spectra [B, C_x, H, Wh, 2], weight [Ci, Co, R, My, 2].
struct MixDims {
    b: usize,
    h: usize,
    wh: usize,
    ci: usize,
    co: usize,
    r: usize,
    my: usize,
}

impl MixDims {
    fn new(spec: &[usize], w: &[usize]) -> Self {
        MixDims { b: spec[0], h: spec[2], wh: spec[3], ci: w[0], co: w[1], r: w[2], my: w[3] }
    }
    /// Complex elements between two channels of a spectrum.
    fn plane(&self) -> usize {
        self.h * self.wh
    }
    /// Complex elements between two output channels of the weight.
    fn block(&self) -> usize {
        self.r * self.my
    }
}

/// A strided complex matrix inside a buffer of interleaved (re, im) values: the complex index of
/// element (0, 0), and the row and column strides, in complex elements.
#[derive(Clone, Copy)]
struct View {
    at: usize,
    rs: usize,
    cs: usize,
    /// Use the conjugate.
    conj: bool,
}

/// A pointer the modes' tasks share; each writes a disjoint set of entries through it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the tasks write disjoint entries (one mode each) and read nothing through it.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that a closure captures the whole `Shared`, not its field).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// C[m, n] = A[m, k] B[k, n] for complex strided views (conjugated as the views say), as four
/// real GEMMs: Cr = Ar Br - sa sb Ai Bi, Ci = sb Ar Bi + sa Ai Br (s = -1 for a conjugate).
///
/// # Safety
/// Every element the views reach lies inside its buffer (2 * index + 1 < len), and no other
/// thread touches C's entries meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn cgemm<T: Float>(m: usize, k: usize, n: usize, a: *const T, av: View, b: *const T, bv: View, c: *mut T, cv: View) {
    let sign = |conj: bool| if conj { -T::one() } else { T::one() };
    let (sa, sb) = (sign(av.conj), sign(bv.conj));
    let part = |p: *const T, v: View, im: usize| (p.add(2 * v.at + im), 2 * v.rs as isize, 2 * v.cs as isize);
    let (ar, ars, acs) = part(a, av, 0);
    let (ai, _, _) = part(a, av, 1);
    let (br, brs, bcs) = part(b, bv, 0);
    let (bi, _, _) = part(b, bv, 1);
    let (cr, crs, ccs) = (c.add(2 * cv.at), 2 * cv.rs as isize, 2 * cv.cs as isize);
    let ci = c.add(2 * cv.at + 1);
    let zero = T::zero();
    T::gemm_raw(m, k, n, T::one(), ar, ars, acs, br, brs, bcs, zero, cr, crs, ccs);
    T::gemm_raw(m, k, n, -(sa * sb), ai, ars, acs, bi, brs, bcs, T::one(), cr, crs, ccs);
    T::gemm_raw(m, k, n, sb, ar, ars, acs, bi, brs, bcs, zero, ci, crs, ccs);
    T::gemm_raw(m, k, n, sa, ai, ars, acs, br, brs, bcs, T::one(), ci, crs, ccs);
}

/// Runs `each(r, row, col)` for every kept mode, in parallel.
fn for_modes(m: &MixDims, rows: &[usize], each: impl Fn(usize, usize, usize) + Sync) {
    (0..rows.len() * m.my).into_par_iter().for_each(|mode| {
        let (r, col) = (mode / m.my, mode % m.my);
        each(r, rows[r], col)
    });
}

pub(super) fn mix_fwd(xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), w.dims());
    with_float!(xh.dtype(), "spectral_mix_fwd", |T| {
        let (xs, ws) = (xh.as_slice::<T>()?, w.as_slice::<T>()?);
        let out = Shared(y.as_mut_slice::<T>()?.as_mut_ptr());
        for_modes(&m, rows, |r, row, col| {
            let spec = row * m.wh + col;
            let x = View { at: spec, rs: m.ci * m.plane(), cs: m.plane(), conj: false };
            let wv = View { at: r * m.my + col, rs: m.co * m.block(), cs: m.block(), conj: false };
            let yv = View { at: spec, rs: m.co * m.plane(), cs: m.plane(), conj: false };
            // SAFETY: the views stay inside [B, C, H, Wh] spectra and the [Ci, Co, R, My] weight
            // (row < H, col < My <= Wh, r < R); this mode's task alone writes its Y entries.
            unsafe { cgemm(m.b, m.ci, m.co, xs.as_ptr(), x, ws.as_ptr(), wv, out.ptr(), yv) }
        });
        Ok(())
    })
}

pub(super) fn mix_bwd_input(dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()> {
    let m = MixDims::new(dyh.dims(), w.dims());
    with_float!(dyh.dtype(), "spectral_mix_bwd_input", |T| {
        let (dys, ws) = (dyh.as_slice::<T>()?, w.as_slice::<T>()?);
        let out = Shared(dxh.as_mut_slice::<T>()?.as_mut_ptr());
        for_modes(&m, rows, |r, row, col| {
            let spec = row * m.wh + col;
            let dy = View { at: spec, rs: m.co * m.plane(), cs: m.plane(), conj: false };
            // conj(W)^T: element (o, i) is W[i, o].
            let wt = View { at: r * m.my + col, rs: m.block(), cs: m.co * m.block(), conj: true };
            let dx = View { at: spec, rs: m.ci * m.plane(), cs: m.plane(), conj: false };
            // SAFETY: as in mix_fwd, for dY, W and dX.
            unsafe { cgemm(m.b, m.co, m.ci, dys.as_ptr(), dy, ws.as_ptr(), wt, out.ptr(), dx) }
        });
        Ok(())
    })
}

pub(super) fn mix_bwd_weight(xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), dw.dims());
    with_float!(xh.dtype(), "spectral_mix_bwd_weight", |T| {
        let (xs, dys) = (xh.as_slice::<T>()?, dyh.as_slice::<T>()?);
        let out = Shared(dw.as_mut_slice::<T>()?.as_mut_ptr());
        for_modes(&m, rows, |r, row, col| {
            let spec = row * m.wh + col;
            // conj(X)^T: element (i, b) is X[b, i]; the batch is the GEMM's inner dimension.
            let xt = View { at: spec, rs: m.plane(), cs: m.ci * m.plane(), conj: true };
            let dy = View { at: spec, rs: m.co * m.plane(), cs: m.plane(), conj: false };
            let dwv = View { at: r * m.my + col, rs: m.co * m.block(), cs: m.block(), conj: false };
            // SAFETY: as in mix_fwd, for X, dY and dW.
            unsafe { cgemm(m.ci, m.b, m.co, xs.as_ptr(), xt, dys.as_ptr(), dy, out.ptr(), dwv) }
        });
        Ok(())
    })
}
