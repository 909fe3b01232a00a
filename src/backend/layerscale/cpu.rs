//! LayerScale on the CPU: the forward in one pass; the backward as the per-channel scale and sum
//! of the layout family.

use rayon::prelude::*;

use crate::backend::bcs;
use crate::backend::cpu::with_float;
use crate::backend::layout::cpu as layout;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn layerscale_fwd(x: &Tensor, branch: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
    let (_, c, s) = bcs(x);
    with_float!(x.dtype(), "layerscale_fwd", |T| {
        let (xs, bs, l) = (x.as_slice::<T>()?, branch.as_slice::<T>()?, l.as_slice::<T>()?);
        if s > 0 {
            y.as_mut_slice::<T>()?.par_chunks_mut(s).zip(xs.par_chunks(s).zip(bs.par_chunks(s))).enumerate().for_each(|(i, (yp, (xp, bp)))| {
                let g = l[i % c];
                for ((y, &x), &b) in yp.iter_mut().zip(xp).zip(bp) {
                    *y = x + g * b;
                }
            });
        }
        Ok(())
    })
}

pub(super) fn layerscale_bwd(dy: &Tensor, branch: &Tensor, l: &Tensor, dbranch: &mut Tensor, dl: &mut Tensor) -> Result<()> {
    layout::channel_scale(dy, l, dbranch)?;
    layout::channel_dot(dy, Some(branch), dl)
}
