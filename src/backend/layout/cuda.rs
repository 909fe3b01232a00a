//! Launchers of kernels/layout.cu.

use cudarc::driver::CudaSlice;

use super::{Concat2Geom, CopyGeom, PlaneGeom, RollGeom};
use crate::backend::gpu::{check_len, elementwise_config, per_block_config, Gpu};
use crate::backend::kernels;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(super) fn channel_bias(gpu: &Gpu, g: PlaneGeom, y: &mut Tensor, bias: &Tensor) -> Result<()> {
    let (y, bias) = (y.cuda_mut()?, bias.cuda()?);
    check_len("channel_bias_f32", "y", y, g.numel())?;
    check_len("channel_bias_f32", "bias", bias, g.c as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::channel_bias_f32(gpu, elementwise_config(g.numel()), y, bias, g) }
}

pub(super) fn channel_scale(gpu: &Gpu, g: PlaneGeom, x: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
    let (x, l, y) = (x.cuda()?, l.cuda()?, y.cuda_mut()?);
    check_len("channel_scale_f32", "x", x, g.numel())?;
    check_len("channel_scale_f32", "y", y, g.numel())?;
    check_len("channel_scale_f32", "l", l, g.c as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::channel_scale_f32(gpu, elementwise_config(g.numel()), x, l, y, g) }
}

/// out[c] = sum over b, s of a[b, c, s] b[b, c, s] (or of a alone): per-plane partials, then
/// summed over b in order.
pub(super) fn channel_dot(gpu: &Gpu, g: PlaneGeom, a: &Tensor, b: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    let (a, b, out) = (a.cuda()?, b.map(Tensor::cuda).transpose()?, out.cuda_mut()?);
    check_len("channel_dot_partials_f32", "a", a, g.numel())?;
    if let Some(b) = b {
        check_len("channel_dot_partials_f32", "b", b, g.numel())?;
    }
    let mut partial = gpu.uninit::<f32>(g.planes())?;
    // SAFETY: lengths checked against the geometry; one block per (b, c) plane.
    unsafe { kernels::channel_dot_partials_f32(gpu, per_block_config(g.planes())?, a, &b, &mut partial, g)? };
    channel_sum_partials(gpu, g, &partial, out)
}

/// out[c] = sum_b partial[b, c], in order of b.
pub(crate) fn channel_sum_partials(gpu: &Gpu, g: PlaneGeom, partial: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
    check_len("channel_sum_partials_f32", "partial", partial, g.planes())?;
    check_len("channel_sum_partials_f32", "out", out, g.c as usize)?;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::channel_sum_partials_f32(gpu, elementwise_config(g.c as usize), partial, out, g) }
}

/// y = the parts side by side along channels: one launch for two parts (`concat2_f32`), else
/// one copy per part.
pub(super) fn concat_channels(gpu: &Gpu, parts: &[&Tensor], geoms: &[CopyGeom], y: &mut Tensor) -> Result<()> {
    if let ([a, b], [ga, gb]) = (parts, geoms) {
        let g = Concat2Geom { s: ga.s, b: ga.b, ca: ga.cs, cb: gb.cs };
        let (a, bb, y) = (a.cuda()?, b.cuda()?, y.cuda_mut()?);
        let n = g.b as usize * g.s as usize;
        check_len("concat2_f32", "a", a, n * g.ca as usize)?;
        check_len("concat2_f32", "bb", bb, n * g.cb as usize)?;
        check_len("concat2_f32", "y", y, n * (g.ca + g.cb) as usize)?;
        // SAFETY: lengths checked against the geometry.
        return unsafe { kernels::concat2_f32(gpu, elementwise_config(y.len()), a, bb, y, g) };
    }
    parts.iter().zip(geoms).try_for_each(|(p, g)| copy_channels(gpu, *g, p, y))
}

/// The parts of x along channels: one launch for two parts (`split2_f32`), else one per part.
pub(super) fn split_channels(gpu: &Gpu, x: &Tensor, geoms: &[CopyGeom], outs: &mut [Tensor]) -> Result<()> {
    if let ([ga, gb], [a, b]) = (geoms, &mut *outs) {
        let g = Concat2Geom { s: ga.s, b: ga.b, ca: ga.cd, cb: gb.cd };
        let (y, a, bb) = (x.cuda()?, a.cuda_mut()?, b.cuda_mut()?);
        let n = g.b as usize * g.s as usize;
        check_len("split2_f32", "y", y, n * (g.ca + g.cb) as usize)?;
        check_len("split2_f32", "a", a, n * g.ca as usize)?;
        check_len("split2_f32", "bb", bb, n * g.cb as usize)?;
        // SAFETY: lengths checked against the geometry.
        return unsafe { kernels::split2_f32(gpu, elementwise_config(y.len()), y, a, bb, g) };
    }
    outs.iter_mut().zip(geoms).try_for_each(|(o, g)| copy_channels(gpu, *g, x, o))
}

pub(super) fn copy_channels(gpu: &Gpu, g: CopyGeom, src: &Tensor, dst: &mut Tensor) -> Result<()> {
    let (src, dst) = (src.cuda()?, dst.cuda_mut()?);
    let (b, s, cs, cd, off) = (g.b as usize, g.s as usize, g.cs as usize, g.cd as usize, g.off as usize);
    check_len("copy_channels_f32", "src", src, b * cs * s)?;
    check_len("copy_channels_f32", "dst", dst, b * cd * s)?;
    let (inner, outer) = if g.slice == 1 { (cd, cs) } else { (cs, cd) };
    if off + inner > outer {
        return Err(Error::invalid("copy_channels_f32", format!("channels {off}..{} do not fit {outer}", off + inner)));
    }
    // SAFETY: lengths and the channel window checked above.
    unsafe { kernels::copy_channels_f32(gpu, elementwise_config(b * inner * s), src, dst, g) }
}

/// g is the complex tensor's [b, c, s]; the channel form is [b, 2c, s].
pub(super) fn pack_complex(gpu: &Gpu, g: PlaneGeom, x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()> {
    let (x, y) = (x.cuda()?, y.cuda_mut()?);
    check_len("pack_complex_f32", "x", x, 2 * g.numel())?;
    check_len("pack_complex_f32", "y", y, 2 * g.numel())?;
    let unpack = unpack as i32;
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::pack_complex_f32(gpu, elementwise_config(g.numel()), x, y, g, unpack) }
}

pub(super) fn roll2d(gpu: &Gpu, g: RollGeom, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let (x, y) = (x.cuda()?, y.cuda_mut()?);
    let n = g.planes as usize * g.h as usize * g.w as usize * g.inner as usize;
    check_len("roll2d_f32", "x", x, n)?;
    check_len("roll2d_f32", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: lengths checked against the geometry.
    unsafe { kernels::roll2d_f32(gpu, elementwise_config(n), x, y, g) }
}
