//! Adaptive gradient clipping on the CPU.

use rayon::prelude::*;

use super::Units;
use crate::backend::cpu::with_float;
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

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
