//! Layout and per-channel kernels on the CPU.

use rayon::prelude::*;

use super::CopyGeom;
use crate::backend::bcs;
use crate::backend::cpu::with_float;
use crate::error::Result;
#[allow(unused_imports)]
use crate::tensor::Element as _;
use crate::tensor::Tensor;

pub(crate) fn channel_bias(y: &mut Tensor, bias: &Tensor) -> Result<()> {
    let (_, c, s) = bcs(y);
    with_float!(y.dtype(), "add_channel_bias", |T| {
        let bias = bias.as_slice::<T>()?;
        if s > 0 {
            y.as_mut_slice::<T>()?.par_chunks_mut(s).enumerate().for_each(|(i, plane)| plane.iter_mut().for_each(|v| *v += bias[i % c]));
        }
        Ok(())
    })
}

pub(crate) fn channel_scale(x: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
    let (_, c, s) = bcs(x);
    with_float!(x.dtype(), "channel_scale", |T| {
        let (xs, l) = (x.as_slice::<T>()?, l.as_slice::<T>()?);
        if s > 0 {
            y.as_mut_slice::<T>()?.par_chunks_mut(s).zip(xs.par_chunks(s)).enumerate().for_each(|(i, (yp, xp))| {
                let g = l[i % c];
                yp.iter_mut().zip(xp).for_each(|(y, &x)| *y = x * g);
            });
        }
        Ok(())
    })
}

pub(crate) fn channel_dot(a: &Tensor, b: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let (bn, c, s) = bcs(a);
    with_float!(a.dtype(), "channel_dot", |T| {
        let a = a.as_slice::<T>()?;
        let b = b.map(|b| b.as_slice::<T>()).transpose()?;
        // One f64 sum per (sample, channel) plane, then summed over samples in order.
        let planes: Vec<f64> = (0..bn * c)
            .into_par_iter()
            .map(|p| {
                let ap = &a[p * s..(p + 1) * s];
                match b {
                    Some(b) => ap.iter().zip(&b[p * s..(p + 1) * s]).map(|(&x, &y)| x.as_f64() * y.as_f64()).sum(),
                    None => ap.iter().map(|&x| x.as_f64()).sum(),
                }
            })
            .collect();
        let y = y.as_mut_slice::<T>()?;
        for (ch, out) in y.iter_mut().enumerate() {
            *out = T::of_f64((0..bn).map(|n| planes[n * c + ch]).sum());
        }
        Ok(())
    })
}

/// Concat (slice 0): dst[:, off .. off + cs] = src; slice: dst = src[:, off .. off + cd].
pub(crate) fn copy_channels(src: &Tensor, dst: &mut Tensor, g: &CopyGeom) -> Result<()> {
    let (b, s, cs, cd, off) = (g.b as usize, g.s as usize, g.cs as usize, g.cd as usize, g.off as usize);
    with_float!(src.dtype(), "copy_channels", |T| {
        let src = src.as_slice::<T>()?;
        let dst = dst.as_mut_slice::<T>()?;
        for n in 0..b {
            if g.slice == 0 {
                let d0 = (n * cd + off) * s;
                dst[d0..d0 + cs * s].copy_from_slice(&src[n * cs * s..(n + 1) * cs * s]);
            } else {
                let s0 = (n * cs + off) * s;
                dst[n * cd * s..(n + 1) * cd * s].copy_from_slice(&src[s0..s0 + cd * s]);
            }
        }
        Ok(())
    })
}

/// y = the parts side by side along channels (one copy per part).
pub(super) fn concat_channels(parts: &[&Tensor], geoms: &[CopyGeom], y: &mut Tensor) -> Result<()> {
    parts.iter().zip(geoms).try_for_each(|(p, g)| copy_channels(p, y, g))
}

/// The parts of x along channels (one copy per part).
pub(super) fn split_channels(x: &Tensor, geoms: &[CopyGeom], outs: &mut [Tensor]) -> Result<()> {
    outs.iter_mut().zip(geoms).try_for_each(|(o, g)| copy_channels(x, o, g))
}

pub(crate) fn roll2d(x: &Tensor, sh: usize, sw: usize, complex: bool, y: &mut Tensor) -> Result<()> {
    let d = x.dims();
    let inner = if complex { 2 } else { 1 };
    let r = d.len() - if complex { 1 } else { 0 };
    let (h, w) = (d[r - 2], d[r - 1]);
    let plane = h * w * inner;
    with_float!(x.dtype(), "roll2d", |T| {
        let xs = x.as_slice::<T>()?;
        if plane == 0 {
            return Ok(());
        }
        y.as_mut_slice::<T>()?.par_chunks_mut(plane).zip(xs.par_chunks(plane)).for_each(|(yp, xp)| {
            for i in 0..h {
                let oi = (i + sh) % h;
                for j in 0..w {
                    let oj = (j + sw) % w;
                    let (src, dst) = ((i * w + j) * inner, (oi * w + oj) * inner);
                    yp[dst..dst + inner].copy_from_slice(&xp[src..src + inner]);
                }
            }
        });
        Ok(())
    })
}

pub(crate) fn pack_complex(x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()> {
    // Sizes of the channel form [B, 2C, S].
    let (b, c2, s) = if unpack { bcs(y) } else { bcs(x) };
    let c = c2 / 2;
    with_float!(x.dtype(), "pack_complex", |T| {
        let xs = x.as_slice::<T>()?;
        let ys = y.as_mut_slice::<T>()?;
        for n in 0..b {
            for ch in 0..c {
                let re = (n * c2 + ch) * s;
                let im = (n * c2 + c + ch) * s;
                let z = (n * c + ch) * s * 2;
                for k in 0..s {
                    if unpack {
                        ys[re + k] = xs[z + 2 * k];
                        ys[im + k] = xs[z + 2 * k + 1];
                    } else {
                        ys[z + 2 * k] = xs[re + k];
                        ys[z + 2 * k + 1] = xs[im + k];
                    }
                }
            }
        }
        Ok(())
    })
}
