//! `CudaBackend`: the [`Backend`] surface on a GPU. Each method takes the GPU from its output's
//! device, the f32 buffers from its tensors, and calls the launcher of the same name; the
//! dispatch functions in `backend/mod.rs` have already checked shapes, dtypes and devices, and
//! the launchers check every length again before launching.

use std::sync::Arc;

use super::conv::ConvGeom;
use super::spectral::SpectralDims;
use super::Gpu;
use crate::backend::{AdamStep, Backend, Binary, Conv2dParams, NormKind, Reduce, SgdStep, Unary, Units};
use crate::error::Result;
use crate::tensor::Tensor;

pub struct CudaBackend;

fn gpu(t: &Tensor) -> Result<Arc<Gpu>> {
    Ok(t.device().gpu()?.clone())
}

/// [B, C, S] sizes of a tensor of rank >= 2.
fn bcs(t: &Tensor) -> (usize, usize, usize) {
    let d = t.dims();
    (d[0], d[1], d[2..].iter().product())
}

/// (planes, H, W) of a real [.., H, W] tensor.
fn planes_hw(t: &Tensor) -> (usize, usize, usize) {
    let d = t.dims();
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    (t.numel() / (h * w).max(1), h, w)
}

fn spectral_dims(spec_in: &Tensor, w: &Tensor) -> SpectralDims {
    let (s, wd) = (spec_in.dims(), w.dims());
    SpectralDims { b: s[0], ci: wd[0], co: wd[1], h: s[2], wh: s[3], my: wd[3] }
}

impl Backend for CudaBackend {
    fn unary(&self, op: Unary, x: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.unary(op, x.cuda()?, y.cuda_mut()?)
    }
    fn unary_bwd(&self, op: Unary, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        gpu(dx)?.unary_bwd(op, x.cuda()?, dy.cuda()?, dx.cuda_mut()?)
    }
    fn binary(&self, op: Binary, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.binary(op, a.cuda()?, b.cuda()?, y.cuda_mut()?)
    }
    fn add_assign(&self, acc: &mut Tensor, other: &Tensor) -> Result<()> {
        gpu(acc)?.add_assign(acc.cuda_mut()?, other.cuda()?)
    }
    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor) -> Result<()> {
        let d = bcs(y);
        gpu(y)?.channel_bias(y.cuda_mut()?, bias.cuda()?, d)
    }
    fn affine(&self, x: &Tensor, alpha: f64, beta: f64, y: &mut Tensor) -> Result<()> {
        gpu(y)?.affine(x.cuda()?, alpha as f32, beta as f32, y.cuda_mut()?)
    }
    fn scale_by(&self, x: &Tensor, s: &Tensor, divide: bool, y: &mut Tensor) -> Result<()> {
        gpu(y)?.scale_by(x.cuda()?, s.cuda()?, divide, y.cuda_mut()?)
    }
    fn reduce(&self, op: Reduce, x: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.reduce_into(op, x.cuda()?, None, y.cuda_mut()?)
    }
    fn reduce_each(&self, op: Reduce, xs: &[&Tensor], y: &mut Tensor) -> Result<()> {
        let bufs = xs.iter().map(|x| x.cuda()).collect::<Result<Vec<_>>>()?;
        gpu(y)?.reduce_each(op, &bufs, y.cuda_mut()?)
    }
    fn dot(&self, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.reduce_into(Reduce::Sum, a.cuda()?, Some(b.cuda()?), y.cuda_mut()?)
    }
    fn broadcast_scalar(&self, g: &Tensor, _like: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.fill_scalar(g.cuda()?, y.cuda_mut()?)
    }
    fn channel_scale(&self, x: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.channel_scale(x.cuda()?, l.cuda()?, y.cuda_mut()?, bcs(x))
    }
    fn channel_dot(&self, a: &Tensor, b: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
        let b = b.map(Tensor::cuda).transpose()?;
        gpu(y)?.channel_dot(a.cuda()?, b, y.cuda_mut()?, bcs(a))
    }
    fn layerscale_fwd(&self, x: &Tensor, branch: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.layerscale_fwd(x.cuda()?, branch.cuda()?, l.cuda()?, y.cuda_mut()?, bcs(x))
    }
    fn layerscale_bwd(&self, dy: &Tensor, branch: &Tensor, l: &Tensor, dbranch: &mut Tensor, dl: &mut Tensor) -> Result<()> {
        let d = bcs(dy);
        gpu(dl)?.layerscale_bwd(dy.cuda()?, branch.cuda()?, l.cuda()?, dbranch.cuda_mut()?, dl.cuda_mut()?, d)
    }
    fn copy_channels(&self, src: &Tensor, dst: &mut Tensor, offset: usize) -> Result<()> {
        let ((b, cs, s), cd) = (bcs(src), dst.dims()[1]);
        gpu(dst)?.copy_channels(src.cuda()?, dst.cuda_mut()?, b, cs, cd, s, offset, false)
    }
    fn slice_channels(&self, src: &Tensor, offset: usize, dst: &mut Tensor) -> Result<()> {
        let ((b, cs, s), cd) = (bcs(src), dst.dims()[1]);
        gpu(dst)?.copy_channels(src.cuda()?, dst.cuda_mut()?, b, cs, cd, s, offset, true)
    }
    fn conv2d_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams, y: &mut Tensor) -> Result<()> {
        let g = ConvGeom::new(x.dims(), w.dims(), y.dims(), p)?;
        let gpu = gpu(y)?;
        gpu.conv2d_fwd(x.cuda()?, w.cuda()?, y.cuda_mut()?, x.dims()[0], w.dims()[0], g)?;
        match b {
            Some(b) => {
                let d = bcs(y);
                gpu.channel_bias(y.cuda_mut()?, b.cuda()?, d)
            }
            None => Ok(()),
        }
    }
    fn conv2d_bwd_input(&self, dy: &Tensor, w: &Tensor, p: Conv2dParams, dx: &mut Tensor) -> Result<()> {
        let g = ConvGeom::new(dx.dims(), w.dims(), dy.dims(), p)?;
        gpu(dx)?.conv2d_bwd_input(dy.cuda()?, w.cuda()?, dx.cuda_mut()?, dy.dims()[0], w.dims()[0], g)
    }
    fn conv2d_bwd_weight(&self, x: &Tensor, dy: &Tensor, p: Conv2dParams, dw: &mut Tensor) -> Result<()> {
        let g = ConvGeom::new(x.dims(), dw.dims(), dy.dims(), p)?;
        let c_out = dw.dims()[0];
        gpu(dw)?.conv2d_bwd_weight(x.cuda()?, dy.cuda()?, dw.cuda_mut()?, x.dims()[0], c_out, g)
    }
    fn rfft2(&self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        let (p, h, w) = planes_hw(x);
        gpu(y)?.rfft2(x.cuda()?, y.cuda_mut()?, p, h, w, false)
    }
    fn rfft2_bwd(&self, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let (p, h, w) = planes_hw(dx);
        gpu(dx)?.irfft2(dy.cuda()?, dx.cuda_mut()?, p, h, w, true)
    }
    fn irfft2(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        let (p, h, w) = planes_hw(y);
        gpu(y)?.irfft2(z.cuda()?, y.cuda_mut()?, p, h, w, false)
    }
    fn irfft2_bwd(&self, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        let (p, h, w) = planes_hw(dy);
        gpu(dz)?.rfft2(dy.cuda()?, dz.cuda_mut()?, p, h, w, true)
    }
    fn spectral_mix_fwd(&self, xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()> {
        let d = spectral_dims(xh, w);
        gpu(y)?.spectral_mix_fwd(xh.cuda()?, w.cuda()?, rows, y.cuda_mut()?, d)
    }
    fn spectral_mix_bwd_input(&self, dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()> {
        let d = spectral_dims(dyh, w);
        gpu(dxh)?.spectral_mix_bwd_input(dyh.cuda()?, w.cuda()?, rows, dxh.cuda_mut()?, d)
    }
    fn spectral_mix_bwd_weight(&self, xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()> {
        let d = spectral_dims(xh, dw);
        gpu(dw)?.spectral_mix_bwd_weight(xh.cuda()?, dyh.cuda()?, rows, dw.cuda_mut()?, d)
    }
    fn norm_fwd(
        &self,
        kind: NormKind,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()> {
        let (gamma, beta) = (gamma.map(Tensor::cuda).transpose()?, beta.map(Tensor::cuda).transpose()?);
        gpu(y)?.norm_fwd(kind, x.cuda()?, gamma, beta, eps as f32, y.cuda_mut()?, mean.cuda_mut()?, rstd.cuda_mut()?, bcs(x))
    }
    fn norm_bwd(
        &self,
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
        let gamma = gamma.map(Tensor::cuda).transpose()?;
        let dgamma = dgamma.map(Tensor::cuda_mut).transpose()?;
        let dbeta = dbeta.map(Tensor::cuda_mut).transpose()?;
        gpu(dx)?.norm_bwd(kind, x.cuda()?, dy.cuda()?, gamma, mean.cuda()?, rstd.cuda()?, dx.cuda_mut()?, dgamma, dbeta, bcs(x))
    }
    fn complex_mul(&self, z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()> {
        gpu(y)?.complex_mul(z.cuda()?, p.cuda()?, conj, y.cuda_mut()?, p.numel() / 2)
    }
    fn fft2(&self, z: &Tensor, inverse: bool, scale: f64, y: &mut Tensor) -> Result<()> {
        let d = z.dims();
        let (h, w) = (d[d.len() - 3], d[d.len() - 2]);
        let planes = z.numel() / (2 * h * w).max(1);
        gpu(y)?.fft2(z.cuda()?, y.cuda_mut()?, planes, h, w, inverse, scale as f32)
    }
    fn roll2d(&self, x: &Tensor, sh: usize, sw: usize, complex: bool, y: &mut Tensor) -> Result<()> {
        let d = x.dims();
        let inner = if complex { 2 } else { 1 };
        let r = d.len() - (inner - 1);
        let (h, w) = (d[r - 2], d[r - 1]);
        let planes = x.numel() / (h * w * inner).max(1);
        gpu(y)?.roll2d(x.cuda()?, y.cuda_mut()?, planes, h, w, inner, sh, sw)
    }
    fn complex_abs(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.complex_unary(z.cuda()?, false, y.cuda_mut()?)
    }
    fn complex_abs_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        gpu(dz)?.complex_unary_bwd(z.cuda()?, dy.cuda()?, false, dz.cuda_mut()?)
    }
    fn complex_angle(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        gpu(y)?.complex_unary(z.cuda()?, true, y.cuda_mut()?)
    }
    fn complex_angle_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        gpu(dz)?.complex_unary_bwd(z.cuda()?, dy.cuda()?, true, dz.cuda_mut()?)
    }
    fn pack_complex(&self, x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()> {
        let (b, c2, s) = if unpack { bcs(y) } else { bcs(x) };
        gpu(y)?.pack_complex(x.cuda()?, y.cuda_mut()?, (b, c2 / 2, s), unpack)
    }
    fn adam_step(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
        gpu(p)?.adam_step(p.cuda_mut()?, g.cuda()?, m.cuda_mut()?, v.cuda_mut()?, h)
    }
    fn sgd_step(&self, p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
        let buf = buf.map(Tensor::cuda_mut).transpose()?;
        gpu(p)?.sgd_step(p.cuda_mut()?, g.cuda()?, buf, h)
    }
    fn agc(&self, w: &Tensor, g: &mut Tensor, units: Units, lambda: f64, eps: f64) -> Result<()> {
        gpu(g)?.agc_unit(w.cuda()?, g.cuda_mut()?, None, units, lambda as f32, eps as f32)
    }
    fn clamp(&self, x: &mut Tensor, c: f64) -> Result<()> {
        gpu(x)?.clamp(x.cuda_mut()?, c as f32)
    }
}
