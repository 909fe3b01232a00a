//! The spectral mode mix on the CPU: per kept mode (row, col), one complex GEMM over the batch
//! (forward: Y[B, Co] = X[B, Ci] W[Ci, Co]; dX[B, Ci] = dY[B, Co] conj(W)^T; dW[Ci, Co] =
//! conj(X)^T[Ci, B] dY[B, Co]), each as four real GEMMs. The operands are first gathered into
//! mode-major planes ([mode][re/im][rows][cols]), so that every GEMM reads contiguous memory (a
//! GEMM on the interleaved tensors directly packs one cache line per element); conjugates and
//! transposes are signs and strides. The modes run in parallel, each writing only its own
//! entries with a fixed sequence of GEMMs, so the result does not depend on the number of threads.

use num_traits::Zero as _;
use rayon::prelude::*;

use crate::backend::cpu::{transpose, transposed, with_float, Float, SharedMut};
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

/// A strided complex matrix inside a buffer: where element (0, 0)'s real and imaginary parts
/// are, and the row and column strides, all in scalars.
#[derive(Clone, Copy)]
struct View {
    re: usize,
    im: usize,
    rs: usize,
    cs: usize,
    /// Use the conjugate.
    conj: bool,
}

impl View {
    /// Mode `k` of a mode-major buffer [M][2][rows][cols], row-major (or transposed).
    fn planar(k: usize, rows: usize, cols: usize, transposed: bool, conj: bool) -> View {
        let re = k * 2 * rows * cols;
        let (rs, cs) = if transposed { (1, cols) } else { (cols, 1) };
        View { re, im: re + rows * cols, rs, cs, conj }
    }
}

/// C[m, n] = A[m, k] B[k, n] of complex views (conjugated as the views say), as four real GEMMs:
/// Cr = Ar Br - sa sb Ai Bi, Ci = sb Ar Bi + sa Ai Br (s = -1 for a conjugate). C's view is
/// into `c` (not conjugated).
fn cgemm<T: Float>((m, k, n): (usize, usize, usize), (a, av): (&[T], View), (b, bv): (&[T], View), (c, cv): (&mut [T], View)) {
    let last = |v: View, rows: usize, cols: usize| v.re.max(v.im) + (rows - 1) * v.rs + (cols - 1) * v.cs;
    assert!(m > 0 && k > 0 && n > 0 && last(av, m, k) < a.len() && last(bv, k, n) < b.len() && last(cv, m, n) < c.len(), "cgemm: a view leaves its buffer");
    let sign = |conj: bool| if conj { -T::one() } else { T::one() };
    let (sa, sb) = (sign(av.conj), sign(bv.conj));
    let (one, zero) = (T::one(), T::zero());
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let (ars, acs, brs, bcs, crs, ccs) = (av.rs as isize, av.cs as isize, bv.rs as isize, bv.cs as isize, cv.rs as isize, cv.cs as isize);
    // SAFETY: the assertion bounds every element the strides reach in each buffer; C is the
    // caller's exclusive slice.
    unsafe {
        let (ar, ai, br, bi, cr, ci) = (a.add(av.re), a.add(av.im), b.add(bv.re), b.add(bv.im), c.add(cv.re), c.add(cv.im));
        T::gemm_raw(m, k, n, one, ar, ars, acs, br, brs, bcs, zero, cr, crs, ccs);
        T::gemm_raw(m, k, n, -(sa * sb), ai, ars, acs, bi, brs, bcs, one, cr, crs, ccs);
        T::gemm_raw(m, k, n, sb, ar, ars, acs, bi, brs, bcs, zero, ci, crs, ccs);
        T::gemm_raw(m, k, n, sa, ai, ars, acs, br, brs, bcs, one, ci, crs, ccs);
    }
}

/// Modes a gather or scatter task handles: a cache line of a weight holds eight f32 modes.
const MODES_PER_TASK: usize = 8;

/// The kept modes of spectra [B, C, H, Wh, 2] as mode-major planes [M][2][B][C] (M = R My, mode
/// r My + col at row rows[r]).
fn gather_spec<T: Float>(m: &MixDims, rows: &[usize], s: &[T], c: usize) -> Vec<T> {
    let per = 2 * m.b * c;
    let mut out = vec![T::zero(); rows.len() * m.my * per];
    out.par_chunks_mut(MODES_PER_TASK * per).enumerate().for_each(|(t, chunk)| {
        for (j, dst) in chunk.chunks_mut(per).enumerate() {
            let mode = t * MODES_PER_TASK + j;
            let at = 2 * (rows[mode / m.my] * m.wh + mode % m.my);
            let (re, im) = dst.split_at_mut(per / 2);
            for (p, (r, i)) in re.iter_mut().zip(im.iter_mut()).enumerate() {
                *r = s[p * 2 * m.plane() + at];
                *i = s[p * 2 * m.plane() + at + 1];
            }
        }
    });
    out
}

/// Writes mode-major planes [M][2][B][C] into the kept modes of spectra [B, C, H, Wh, 2] (the
/// other modes are left as they are).
fn scatter_spec<T: Float>(m: &MixDims, rows: &[usize], src: &[T], c: usize, s: &mut [T]) {
    let per = 2 * m.b * c;
    let out = SharedMut(s.as_mut_ptr());
    let len = s.len();
    src.par_chunks(MODES_PER_TASK * per).enumerate().for_each(|(t, chunk)| {
        for (j, from) in chunk.chunks(per).enumerate() {
            let mode = t * MODES_PER_TASK + j;
            let at = 2 * (rows[mode / m.my] * m.wh + mode % m.my);
            let (re, im) = from.split_at(per / 2);
            for (p, (&r, &i)) in re.iter().zip(im).enumerate() {
                let k = p * 2 * m.plane() + at;
                assert!(k + 1 < len);
                // SAFETY: in bounds (asserted); mode `mode`'s task alone writes its (row, col).
                unsafe {
                    *out.ptr().add(k) = r;
                    *out.ptr().add(k + 1) = i;
                }
            }
        }
    });
}

/// The weight [Ci, Co, R, My, 2] as mode-major planes [M][2][Ci][Co]: the transpose of the
/// weight read as [Ci Co, 2 M].
fn gather_w<T: Float>(m: &MixDims, w: &[T]) -> Vec<T> {
    transposed(w, m.ci * m.co, 2 * m.block())
}

/// Writes mode-major planes [M][2][Ci][Co] into the weight layout [Ci, Co, R, My, 2].
fn scatter_w<T: Float>(m: &MixDims, src: &[T], w: &mut [T]) {
    transpose(src, 2 * m.block(), m.ci * m.co, w);
}

/// Spectra through the weight, mode by mode: the forward (Y[B, Co] = X W, `adjoint` false) or
/// dX (dX[B, Ci] = dY conj(W)^T, `adjoint` true, reading W's [Ci][Co] planes transposed).
fn through_w<T: Float>(m: &MixDims, rows: &[usize], src: &[T], w: &[T], adjoint: bool, dst: &mut [T]) {
    let (c_in, c_out) = if adjoint { (m.co, m.ci) } else { (m.ci, m.co) };
    let xm = gather_spec(m, rows, src, c_in);
    let wm = gather_w(m, w);
    let mut ym = vec![T::zero(); m.block() * 2 * m.b * c_out];
    ym.par_chunks_mut(2 * m.b * c_out).enumerate().for_each(|(k, yk)| {
        let x = View::planar(k, m.b, c_in, false, false);
        let wv = View::planar(k, m.ci, m.co, adjoint, adjoint);
        cgemm((m.b, c_in, c_out), (&xm, x), (&wm, wv), (yk, View::planar(0, m.b, c_out, false, false)));
    });
    scatter_spec(m, rows, &ym, c_out, dst);
}

pub(super) fn spectral_mix_fwd(xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), w.dims());
    with_float!(xh.dtype(), "spectral_mix_fwd", |T| {
        through_w(&m, rows, xh.as_slice::<T>()?, w.as_slice::<T>()?, false, y.as_mut_slice::<T>()?);
        Ok(())
    })
}

pub(super) fn spectral_mix_bwd_input(dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()> {
    let m = MixDims::new(dyh.dims(), w.dims());
    with_float!(dyh.dtype(), "spectral_mix_bwd_input", |T| {
        through_w(&m, rows, dyh.as_slice::<T>()?, w.as_slice::<T>()?, true, dxh.as_mut_slice::<T>()?);
        Ok(())
    })
}

pub(super) fn spectral_mix_bwd_weight(xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()> {
    let m = MixDims::new(xh.dims(), dw.dims());
    with_float!(xh.dtype(), "spectral_mix_bwd_weight", |T| {
        let xm = gather_spec(&m, rows, xh.as_slice::<T>()?, m.ci);
        let dym = gather_spec(&m, rows, dyh.as_slice::<T>()?, m.co);
        let mut dwm = vec![T::zero(); m.block() * 2 * m.ci * m.co];
        dwm.par_chunks_mut(2 * m.ci * m.co).enumerate().for_each(|(k, dwk)| {
            // conj(X)^T: [Ci, B] read from X's [B][Ci] plane; the batch is the inner dimension.
            let xt = View::planar(k, m.b, m.ci, true, true);
            let dy = View::planar(k, m.b, m.co, false, false);
            cgemm((m.ci, m.b, m.co), (&xm, xt), (&dym, dy), (dwk, View::planar(0, m.ci, m.co, false, false)));
        });
        scatter_w(&m, &dwm, dw.as_mut_slice::<T>()?);
        Ok(())
    })
}
