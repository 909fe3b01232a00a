//! LayerNorm, RMSNorm and InstanceNorm on the CPU, statistics in f64.
//!
//! x is viewed as [B, C, S]. LayerNorm and RMSNorm normalise each (b, s) over its C channels;
//! InstanceNorm each (b, c) over its S positions. With xhat = (x - mean) * rstd (mean = 0 for RMS),
//! y = xhat * gamma[c] + beta[c]. Backward, per group of N elements with g = dy * gamma:
//!   centred:  dx = rstd (g - mean(g) - xhat mean(g xhat))
//!   RMS:      dx = rstd (g - xhat mean(g xhat))
//!   dgamma[c] = sum dy xhat,  dbeta[c] = sum dy  (per-sample partials summed in sample order).

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::NormKind;
use crate::backend::bcs;
use crate::backend::cpu::with_float;
use crate::error::Result;
use crate::tensor::Tensor;

/// How one sample's [C, S] block splits into normalisation groups.
#[derive(Clone, Copy)]
struct Groups {
    over_channels: bool,
    c: usize,
    s: usize,
}

impl Groups {
    fn count(&self) -> usize {
        if self.over_channels {
            self.s
        } else {
            self.c
        }
    }
    fn len(&self) -> usize {
        if self.over_channels {
            self.c
        } else {
            self.s
        }
    }
    /// (flat index in the sample block, channel) of element j of group g.
    #[inline]
    fn at(&self, g: usize, j: usize) -> (usize, usize) {
        if self.over_channels {
            (j * self.s + g, j)
        } else {
            (g * self.s + j, g)
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn fwd(
    kind: NormKind,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
    y: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    let (_, c, s) = bcs(x);
    let gr = Groups { over_channels: kind.over_channels(), c, s };
    let (ng, n) = (gr.count(), gr.len());
    with_float!(x.dtype(), "norm_fwd", |T| {
        let xs = x.as_slice::<T>()?;
        let gamma = gamma.map(|t| t.as_slice::<T>()).transpose()?;
        let beta = beta.map(|t| t.as_slice::<T>()).transpose()?;
        let ms = mean.as_mut_slice::<T>()?;
        let rs = rstd.as_mut_slice::<T>()?;
        let block = c * s;
        if block == 0 || ng == 0 {
            return Ok(());
        }
        y.as_mut_slice::<T>()?.par_chunks_mut(block).zip(xs.par_chunks(block)).zip(ms.par_chunks_mut(ng).zip(rs.par_chunks_mut(ng))).for_each(
            |((yb, xb), (mb, rb))| {
                for g in 0..ng {
                    let mu = if kind.centres() { (0..n).map(|j| xb[gr.at(g, j).0].as_f64()).sum::<f64>() / n as f64 } else { 0.0 };
                    let var = (0..n)
                        .map(|j| {
                            let d = xb[gr.at(g, j).0].as_f64() - mu;
                            d * d
                        })
                        .sum::<f64>()
                        / n as f64;
                    let r = 1.0 / (var + eps).sqrt();
                    mb[g] = T::of_f64(mu);
                    rb[g] = T::of_f64(r);
                    for j in 0..n {
                        let (k, ch) = gr.at(g, j);
                        let mut v = (xb[k].as_f64() - mu) * r;
                        if let Some(gm) = gamma {
                            v *= gm[ch].as_f64();
                        }
                        if let Some(bt) = beta {
                            v += bt[ch].as_f64();
                        }
                        yb[k] = T::of_f64(v);
                    }
                }
            },
        );
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    kind: NormKind,
    x: &Tensor,
    dy: &Tensor,
    gamma: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &mut Tensor,
    dgamma: Option<&mut Tensor>,
    dbeta: Option<&mut Tensor>,
) -> Result<()> {
    let (_, c, s) = bcs(x);
    let gr = Groups { over_channels: kind.over_channels(), c, s };
    let (ng, n) = (gr.count(), gr.len());
    let block = c * s;
    if block == 0 || ng == 0 {
        return Ok(());
    }
    with_float!(x.dtype(), "norm_bwd", |T| {
        let (xs, dys) = (x.as_slice::<T>()?, dy.as_slice::<T>()?);
        let (ms, rs) = (mean.as_slice::<T>()?, rstd.as_slice::<T>()?);
        let gamma = gamma.map(|t| t.as_slice::<T>()).transpose()?;
        // Per sample: its dx block, and its partial [dgamma | dbeta] sums.
        let partials: Vec<Vec<f64>> = dx
            .as_mut_slice::<T>()?
            .par_chunks_mut(block)
            .enumerate()
            .map(|(b, dxb)| {
                let xb = &xs[b * block..(b + 1) * block];
                let dyb = &dys[b * block..(b + 1) * block];
                let mut part = vec![0.0f64; 2 * c];
                for g in 0..ng {
                    let (mu, r) = (ms[b * ng + g].as_f64(), rs[b * ng + g].as_f64());
                    let (mut mean_g, mut mean_gx) = (0.0, 0.0);
                    for j in 0..n {
                        let (k, ch) = gr.at(g, j);
                        let xhat = (xb[k].as_f64() - mu) * r;
                        let d = dyb[k].as_f64();
                        let gv = d * gamma.map_or(1.0, |gm| gm[ch].as_f64());
                        mean_g += gv;
                        mean_gx += gv * xhat;
                        part[ch] += d * xhat;
                        part[c + ch] += d;
                    }
                    mean_g /= n as f64;
                    mean_gx /= n as f64;
                    if !kind.centres() {
                        mean_g = 0.0;
                    }
                    for j in 0..n {
                        let (k, ch) = gr.at(g, j);
                        let xhat = (xb[k].as_f64() - mu) * r;
                        let gv = dyb[k].as_f64() * gamma.map_or(1.0, |gm| gm[ch].as_f64());
                        dxb[k] = T::of_f64(r * (gv - mean_g - xhat * mean_gx));
                    }
                }
                part
            })
            .collect();
        let total = |off: usize| -> Vec<f64> { (0..c).map(|ch| partials.iter().map(|p| p[off + ch]).sum()).collect() };
        if let Some(dg) = dgamma {
            for (o, v) in dg.as_mut_slice::<T>()?.iter_mut().zip(total(0)) {
                *o = T::of_f64(v);
            }
        }
        if let Some(db) = dbeta {
            for (o, v) in db.as_mut_slice::<T>()?.iter_mut().zip(total(c)) {
                *o = T::of_f64(v);
            }
        }
        Ok(())
    })
}
