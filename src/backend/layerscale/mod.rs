//! The fused LayerScale residual (kernels/layerscale.cu): y = x + l[c] branch, and its backward
//! for the branch and the gains in one op (dbranch = l[c] dy, dl[c] = sum over b, s of dy branch;
//! dx = dy needs no kernel). Geometry: the activation's `PlaneGeom`.

mod cpu;
mod cuda;

use super::layout::check_channel_vec;
use super::{check_eq, check_same, compute, on_device};
use crate::error::Result;
use crate::tensor::Tensor;

pub fn layerscale(x: &Tensor, branch: &Tensor, l: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("layerscale");
    check_same("layerscale", &[x, branch, l])?;
    check_eq("layerscale", x, branch)?;
    let g = check_channel_vec("layerscale", x, l)?;
    compute(x.shape().clone(), x, |y| cpu::layerscale_fwd(x, branch, l, y), |gpu, y| cuda::layerscale_fwd(gpu, g, x, branch, l, y))
}

/// The backward for the branch and the gains: (l[c] dy, sum_{b,s} dy branch).
pub fn layerscale_bwd(dy: &Tensor, branch: &Tensor, l: &Tensor) -> Result<(Tensor, Tensor)> {
    let _p = super::profile::scope("layerscale_bwd");
    check_same("layerscale_bwd", &[dy, branch, l])?;
    check_eq("layerscale_bwd", dy, branch)?;
    let g = check_channel_vec("layerscale_bwd", dy, l)?;
    let mut dbranch = Tensor::zeros(dy.shape().clone(), dy.dtype(), dy.device())?;
    let mut dl = Tensor::zeros(l.shape().clone(), l.dtype(), l.device())?;
    on_device(
        dy.device(),
        (&mut dbranch, &mut dl),
        |(db, dl)| cpu::layerscale_bwd(dy, branch, l, db, dl),
        |gpu, (db, dl)| cuda::layerscale_bwd(gpu, g, dy, branch, l, db, dl),
    )?;
    Ok((dbranch, dl))
}
