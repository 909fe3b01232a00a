//! The spectral mode mix on the CPU: one task per output plane ((b, o) for the forward, (b, i) for
//! dX) or weight block ((i, o) for dW, the batch summed in order inside it).

use rayon::prelude::*;

use crate::backend::cpu::{with_float, Float};
use crate::error::Result;
use crate::tensor::Tensor;

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
