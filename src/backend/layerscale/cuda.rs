//! Launchers of kernels/layerscale.cu.

use crate::backend::gpu::{check_len, elementwise_config, per_block_config, Gpu};
use crate::backend::kernels::{self, PlaneGeom};
use crate::backend::layout::cuda::channel_sum_partials;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn layerscale_fwd(gpu: &Gpu, g: PlaneGeom, x: &Tensor, br: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
    let (x, br, l, y) = (x.cuda()?, br.cuda()?, l.cuda()?, y.cuda_mut()?);
    for (name, buf) in [("x", x), ("br", br)] {
        check_len("layerscale_fwd_f32", name, buf, g.numel())?;
    }
    check_len("layerscale_fwd_f32", "y", y, g.numel())?;
    check_len("layerscale_fwd_f32", "l", l, g.c as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::layerscale_fwd_f32(gpu, elementwise_config(g.numel()), x, br, l, y, g) }
}

/// dbr = l dy and dl = sum_{b,s} dy br (deterministic: per-plane partials summed in order).
pub(super) fn layerscale_bwd(gpu: &Gpu, g: PlaneGeom, dy: &Tensor, br: &Tensor, l: &Tensor, dbr: &mut Tensor, dl: &mut Tensor) -> Result<()> {
    let (dy, br, l, dbr, dl) = (dy.cuda()?, br.cuda()?, l.cuda()?, dbr.cuda_mut()?, dl.cuda_mut()?);
    check_len("layerscale_bwd_f32", "dy", dy, g.numel())?;
    check_len("layerscale_bwd_f32", "br", br, g.numel())?;
    check_len("layerscale_bwd_f32", "dbr", dbr, g.numel())?;
    check_len("layerscale_bwd_f32", "l", l, g.c as usize)?;
    let mut partial = gpu.uninit::<f32>(g.planes())?;
    // SAFETY: lengths checked against the geometry; one block per (b, c) plane.
    unsafe { kernels::layerscale_bwd_f32(gpu, per_block_config(g.planes())?, dy, br, l, dbr, &mut partial, g)? };
    channel_sum_partials(gpu, g, &partial, dl)
}
