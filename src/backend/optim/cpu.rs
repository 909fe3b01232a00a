//! Optimiser updates on the CPU, in place, arithmetic in f64.
//!
//! Adam:  g' = s g (+ wd p unless decoupled); m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
//!        p = p (1 - lr wd if decoupled) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! SGD:   g' = s g + wd p; buf = g' (first) or mu buf + g'; p -= lr (g' + mu buf if nesterov else buf)

#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{AdamStep, SgdStep};
use crate::backend::cpu::{with_float, Float, CHUNK};
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

pub(super) fn adam_step(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
    with_float!(p.dtype(), "adam_step", |T| {
        let gs = g.as_slice::<T>()?;
        let ms = m.as_mut_slice::<T>()?;
        let vs = v.as_mut_slice::<T>()?;
        p.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK)).zip(ms.par_chunks_mut(CHUNK).zip(vs.par_chunks_mut(CHUNK))).for_each(
            |((pc, gc), (mc, vc))| {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { adam_piece_avx2(h, pc, gc, mc, vc) };
                }
                adam_piece(h, pc, gc, mc, vc)
            },
        );
        Ok(())
    })
}

/// Adam over one piece, compiled for the baseline and (below) for AVX2, where its f64 divisions
/// and square roots run 4 wide: the same IEEE operations in the same order, so the same bits.
/// A plain `for` over zipped slices (no indexing, no bounds checks), so that it vectorises.
#[inline(always)]
fn adam_piece<T: Float>(h: &AdamStep, pc: &mut [T], gc: &[T], mc: &mut [T], vc: &mut [T]) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    // Decoupled weight decay scales p (by 1 otherwise, which is exact); Adam's L2 term adds to g.
    let keep = if h.decoupled { 1.0 - h.lr * h.weight_decay } else { 1.0 };
    for (((pv, &gv), mv), vv) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut()) {
        let p = pv.as_f64();
        let g = if h.decoupled { h.grad_scale * gv.as_f64() } else { h.grad_scale * gv.as_f64() + h.weight_decay * p };
        let m = h.beta1 * mv.as_f64() + (1.0 - h.beta1) * g;
        let v = h.beta2 * vv.as_f64() + (1.0 - h.beta2) * g * g;
        *mv = T::of_f64(m);
        *vv = T::of_f64(v);
        *pv = T::of_f64(p * keep - h.lr * (m / bc1) / ((v / bc2).sqrt() + h.eps));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn adam_piece_avx2<T: Float>(h: &AdamStep, pc: &mut [T], gc: &[T], mc: &mut [T], vc: &mut [T]) {
    adam_piece(h, pc, gc, mc, vc)
}

pub(super) fn sgd_step(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adams_avx2_piece_gives_the_baselines_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for decoupled in [false, true] {
                let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, decoupled, step: 7, grad_scale: 0.5 };
                let n = 1037;
                let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
                let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
                let m0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.07).sin() * 0.1).collect();
                let v0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).cos().abs() * 0.01).collect();
                let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
                let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
                adam_piece(&h, &mut p1, &g, &mut m1, &mut v1);
                // SAFETY: the CPU has AVX2.
                unsafe { adam_piece_avx2(&h, &mut p2, &g, &mut m2, &mut v2) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!((bits(&p1), bits(&m1), bits(&v1)), (bits(&p2), bits(&m2), bits(&v2)), "decoupled {decoupled}");
                assert_ne!(bits(&p1), bits(&p0), "the update moved nothing");
            }
        }
    }
}
