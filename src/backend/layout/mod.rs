//! Layout and per-channel glue on [B, C, S] activations (kernels/layout.cu): per-channel bias,
//! scale and sum (the gradient of a per-channel vector), channel concat and slice, complex
//! packing, circular shifts. Geometries: `PlaneGeom` (an activation), `CopyGeom` (a concat or
//! slice), `RollGeom` (a shift), mirrored in kernels/params.cuh.

pub(crate) mod cpu;
pub(crate) mod cuda;

pub use super::kernels::{Concat2Geom, CopyGeom, PlaneGeom, RollGeom};
use super::{bcs, check_complex, check_compute, check_eq, check_same, check_spatial, compute, int, on_device};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

impl PlaneGeom {
    /// The [B, C, S] view of an activation of rank >= 2.
    pub fn of(op: &'static str, t: &Tensor) -> Result<PlaneGeom> {
        if t.rank() < 2 {
            return Err(Error::bad_shape(op, t.shape(), "expected [B, C, ...]"));
        }
        let (b, c, s) = bcs(t);
        Ok(PlaneGeom { s: s as i64, b: int(op, b)?, c: int(op, c)? })
    }
    /// Elements of the activation.
    pub fn numel(&self) -> usize {
        self.b as usize * self.c as usize * self.s as usize
    }
    /// Its (b, c) planes.
    pub fn planes(&self) -> usize {
        self.b as usize * self.c as usize
    }
}

/// Checks a per-channel vector l [C] against x [B, C, ...].
pub(crate) fn check_channel_vec(op: &'static str, x: &Tensor, l: &Tensor) -> Result<PlaneGeom> {
    let g = PlaneGeom::of(op, x)?;
    if l.dims() != [x.dims()[1]] {
        return Err(Error::mismatch_because(op, x.shape(), l.shape(), "per-channel vector must be [C]"));
    }
    Ok(g)
}

/// In place: y[b, c, s] += bias[c] (the bias of a convolution).
pub(crate) fn add_channel_bias(y: &mut Tensor, bias: &Tensor) -> Result<()> {
    let g = check_channel_vec("add_channel_bias", y, bias)?;
    let dev = y.device().clone();
    on_device(&dev, y, |y| cpu::channel_bias(y, bias), |gpu, y| cuda::channel_bias(gpu, g, y, bias))
}

/// y[b, c, ...] = x[b, c, ...] * l[c].
pub fn channel_scale(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("channel_scale");
    check_same("channel_scale", &[x, l])?;
    let g = check_channel_vec("channel_scale", x, l)?;
    compute(x.shape().clone(), x, |y| cpu::channel_scale(x, l, y), |gpu, y| cuda::channel_scale(gpu, g, x, l, y))
}

/// Per-channel sums over batch and space of a * b (or of a): the gradient of a per-channel vector.
pub fn channel_dot(a: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _p = super::profile::scope("channel_dot");
    check_compute("channel_dot", a)?;
    let g = PlaneGeom::of("channel_dot", a)?;
    if let Some(b) = b {
        check_same("channel_dot", &[a, b])?;
        check_eq("channel_dot", a, b)?;
    }
    compute([a.dims()[1]], a, |y| cpu::channel_dot(a, b, y), |gpu, y| cuda::channel_dot(gpu, g, a, b, y))
}

/// Concatenation of [B, C_i, S...] tensors along channels.
pub fn concat_channels(parts: &[&Tensor]) -> Result<Tensor> {
    let _p = super::profile::scope("concat_channels");
    let first = *parts.first().ok_or_else(|| Error::invalid("concat_channels", "nothing to concatenate"))?;
    check_same("concat_channels", parts)?;
    if first.rank() < 2 {
        return Err(Error::bad_shape("concat_channels", first.shape(), "expected [B, C, ...]"));
    }
    let mut c_total = 0;
    for p in parts {
        if p.rank() != first.rank() || p.dims()[0] != first.dims()[0] || p.dims()[2..] != first.dims()[2..] {
            return Err(Error::mismatch_because("concat_channels", first.shape(), p.shape(), "all but the channel dimension must agree"));
        }
        c_total += p.dims()[1];
    }
    let mut dims = first.dims().to_vec();
    dims[1] = c_total;
    let (b, _, s) = bcs(first);
    let mut geoms = Vec::with_capacity(parts.len());
    let mut off = 0;
    for p in parts {
        let g = CopyGeom {
            s: s as i64,
            b: int("concat_channels", b)?,
            cs: int("concat_channels", p.dims()[1])?,
            cd: int("concat_channels", c_total)?,
            off: int("concat_channels", off)?,
            slice: 0,
        };
        geoms.push(g);
        off += p.dims()[1];
    }
    compute(dims, first, |y| cpu::concat_channels(parts, &geoms, y), |gpu, y| cuda::concat_channels(gpu, parts, &geoms, y))
}

/// x [B, C, ...] cut along channels into parts of `widths` channels (summing to C): what
/// [`concat_channels`] joined, taken apart (its gradient), in one launch for two parts on a GPU.
pub fn split_channels(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let _p = super::profile::scope("split_channels");
    const OP: &str = "split_channels";
    check_compute(OP, x)?;
    if x.rank() < 2 || widths.iter().sum::<usize>() != x.dims()[1] || widths.is_empty() {
        return Err(Error::bad_shape(OP, x.shape(), format!("channels do not split into parts of {widths:?}")));
    }
    let (b, c, s) = bcs(x);
    let mut geoms = Vec::with_capacity(widths.len());
    let mut outs = Vec::with_capacity(widths.len());
    let mut off = 0;
    for &w in widths {
        geoms.push(CopyGeom { s: s as i64, b: int(OP, b)?, cs: int(OP, c)?, cd: int(OP, w)?, off: int(OP, off)?, slice: 1 });
        let mut dims = x.dims().to_vec();
        dims[1] = w;
        outs.push(Tensor::uninit(dims, x.dtype(), x.device())?);
        off += w;
    }
    on_device(x.device(), &mut outs, |outs| cpu::split_channels(x, &geoms, outs), |gpu, outs| cuda::split_channels(gpu, x, &geoms, outs))?;
    Ok(outs)
}

/// Channels offset..offset + len of x [B, C, ...].
pub fn slice_channels(x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
    let _p = super::profile::scope("slice_channels");
    check_compute("slice_channels", x)?;
    if x.rank() < 2 || offset + len > x.dims()[1] {
        return Err(Error::bad_shape("slice_channels", x.shape(), format!("channels {offset}..{} out of range", offset + len)));
    }
    let mut dims = x.dims().to_vec();
    dims[1] = len;
    let (b, c, s) = bcs(x);
    let op = "slice_channels";
    let g = CopyGeom { s: s as i64, b: int(op, b)?, cs: int(op, c)?, cd: int(op, len)?, off: int(op, offset)?, slice: 1 };
    compute(dims, x, |y| cpu::copy_channels(x, y, &g), |gpu, y| cuda::copy_channels(gpu, g, x, y))
}

/// [B, 2C, ...] channels (real parts then imaginary parts) -> complex [B, C, ..., 2].
pub fn channels_to_complex(x: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("channels_to_complex");
    check_compute("channels_to_complex", x)?;
    if x.rank() < 2 || !x.dims()[1].is_multiple_of(2) {
        return Err(Error::bad_shape("channels_to_complex", x.shape(), "expected [B, 2C, ...] with an even channel count"));
    }
    let mut d = x.dims().to_vec();
    d[1] /= 2;
    d.push(2);
    let (b, c2, s) = bcs(x);
    let g = PlaneGeom { s: s as i64, b: int("channels_to_complex", b)?, c: int("channels_to_complex", c2 / 2)? };
    compute(d, x, |y| cpu::pack_complex(x, false, y), |gpu, y| cuda::pack_complex(gpu, g, x, false, y))
}

/// Complex [B, C, ..., 2] -> [B, 2C, ...] channels (real parts then imaginary parts).
pub fn complex_to_channels(z: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("complex_to_channels");
    check_compute("complex_to_channels", z)?;
    check_complex("complex_to_channels", z, 3)?;
    let mut d = z.dims()[..z.rank() - 1].to_vec();
    let g = PlaneGeom { s: (d[2..].iter().product::<usize>()) as i64, b: int("complex_to_channels", d[0])?, c: int("complex_to_channels", d[1])? };
    d[1] *= 2;
    compute(d, z, |y| cpu::pack_complex(z, true, y), |gpu, y| cuda::pack_complex(gpu, g, z, true, y))
}

/// Circular shift by (sh, sw) of the (H, W) dimensions; `complex` says a trailing 2 follows them.
pub fn roll2d(x: &Tensor, sh: usize, sw: usize, complex: bool) -> Result<Tensor> {
    let _p = super::profile::scope("roll2d");
    check_compute("roll2d", x)?;
    if complex {
        check_complex("roll2d", x, 3)?;
    } else {
        check_spatial("roll2d", x)?;
    }
    let d = x.dims();
    let inner = if complex { 2 } else { 1 };
    let r = d.len() - (inner - 1);
    let (h, w) = (d[r - 2], d[r - 1]);
    let op = "roll2d";
    let g = RollGeom {
        planes: (x.numel() / (h * w * inner).max(1)) as i64,
        h: int(op, h)?,
        w: int(op, w)?,
        inner: int(op, inner)?,
        sh: int(op, sh % h.max(1))?,
        sw: int(op, sw % w.max(1))?,
    };
    compute(x.shape().clone(), x, |y| cpu::roll2d(x, sh, sw, complex, y), |gpu, y| cuda::roll2d(gpu, g, x, y))
}
