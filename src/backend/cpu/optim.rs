//! Optimiser updates and clipping kernels on the CPU, all in place, arithmetic in f64.
//!
//! Adam:  g' = s g (+ wd p unless decoupled); m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
//!        p = p (1 - lr wd if decoupled) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! SGD:   g' = s g + wd p; buf = g' (first) or mu buf + g'; p -= lr (g' + mu buf if nesterov else buf)

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{with_float, CHUNK};
use crate::backend::{AdamStep, SgdStep, Units};
use crate::error::{Error, Result};
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::{DType, Tensor};

pub(super) fn adam(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    with_float!(p.dtype(), "adam_step", |T| {
        let gs = g.as_slice::<T>()?;
        let ms = m.as_mut_slice::<T>()?;
        let vs = v.as_mut_slice::<T>()?;
        p.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK)).zip(ms.par_chunks_mut(CHUNK).zip(vs.par_chunks_mut(CHUNK))).for_each(
            |((pc, gc), (mc, vc))| {
                for i in 0..pc.len() {
                    let mut pv = pc[i].as_f64();
                    let mut gv = h.grad_scale * gc[i].as_f64();
                    if h.decoupled {
                        pv *= 1.0 - h.lr * h.weight_decay;
                    } else {
                        gv += h.weight_decay * pv;
                    }
                    let mv = h.beta1 * mc[i].as_f64() + (1.0 - h.beta1) * gv;
                    let vv = h.beta2 * vc[i].as_f64() + (1.0 - h.beta2) * gv * gv;
                    mc[i] = T::of_f64(mv);
                    vc[i] = T::of_f64(vv);
                    pv -= h.lr * (mv / bc1) / ((vv / bc2).sqrt() + h.eps);
                    pc[i] = T::of_f64(pv);
                }
            },
        );
        Ok(())
    })
}

pub(super) fn sgd(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
    with_float!(p.dtype(), "sgd_step", |T| {
        let gs = g.as_slice::<T>()?;
        let mut buf = buf;
        let bs: Option<&mut [T]> = match buf.as_mut() {
            Some(b) => Some(b.as_mut_slice::<T>()?),
            None => None,
        };
        let ps = p.as_mut_slice::<T>()?;
        let update = |pv: &mut T, gv: T, bv: Option<&mut T>| {
            let x = pv.as_f64();
            let d = h.grad_scale * gv.as_f64() + h.weight_decay * x;
            let step = match bv {
                None => d,
                Some(b) => {
                    let nb = if h.first { d } else { h.momentum * b.as_f64() + d };
                    *b = T::of_f64(nb);
                    if h.nesterov {
                        d + h.momentum * nb
                    } else {
                        nb
                    }
                }
            };
            *pv = T::of_f64(x - h.lr * step);
        };
        match bs {
            Some(bs) => ps.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK).zip(bs.par_chunks_mut(CHUNK))).for_each(|(pc, (gc, bc))| {
                for i in 0..pc.len() {
                    update(&mut pc[i], gc[i], Some(&mut bc[i]));
                }
            }),
            None => ps.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK)).for_each(|(pc, gc)| {
                for i in 0..pc.len() {
                    update(&mut pc[i], gc[i], None);
                }
            }),
        }
        Ok(())
    })
}

/// Adaptive gradient clipping in place (kernels/agc.cu's formula): each unit's sums of squares
/// in f64, kept as the tensor type keeps them (as `reduce` would return them), its factor in f64
/// rounded to the tensor type, and the unit's gradient multiplied by it.
pub(super) fn agc(w: &Tensor, g: &mut Tensor, units: Units, lambda: f64, eps: f64) -> Result<()> {
    let (pre, n_units, post) = units;
    if post == 0 || n_units == 0 {
        return Ok(());
    }
    with_float!(g.dtype(), "agc", |T| {
        let unit_sumsq = |xs: &[T]| -> Vec<f64> {
            (0..n_units)
                .into_par_iter()
                .map(|u| {
                    (0..pre).map(|a| xs[(a * n_units + u) * post..(a * n_units + u + 1) * post].iter().map(|v| v.as_f64().powi(2)).sum::<f64>()).sum::<f64>()
                })
                .map(|v| T::of_f64(v).as_f64())
                .collect()
        };
        let (wn, gn) = (unit_sumsq(w.as_slice::<T>()?), unit_sumsq(g.as_slice::<T>()?));
        let factors: Vec<f64> = wn
            .iter()
            .zip(&gn)
            .map(|(w2, g2)| {
                let max = lambda * w2.sqrt().max(eps);
                let n = g2.sqrt();
                if n > max {
                    max / n
                } else {
                    1.0
                }
            })
            .collect();
        if factors.iter().all(|&f| f >= 1.0) {
            return Ok(());
        }
        let factors: Vec<T> = factors.into_iter().map(T::of_f64).collect();
        g.as_mut_slice::<T>()?.par_chunks_mut(post).enumerate().for_each(|(k, c)| c.iter_mut().for_each(|v| *v *= factors[k % n_units]));
        Ok(())
    })
}
