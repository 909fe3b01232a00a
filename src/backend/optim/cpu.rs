//! Optimiser updates on the CPU, in place, arithmetic in f64.
//!
//! Adam:  g' = s g (+ wd p unless decoupled); m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
//!        p = p (1 - lr wd if decoupled) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! SGD:   g' = s g + wd p; buf = g' (first) or mu buf + g'; p -= lr (g' + mu buf if nesterov else buf)

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{AdamStep, SgdStep};
use crate::backend::cpu::{with_float, CHUNK};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

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
