//! The spectral mode multiply of the Fourier layer (kernels/spectral.cu), forward and both
//! backward products, on the kept modes of half spectra:
//!
//!   forward:  Y[b, o, row_r, c]  = sum_i X[b, i, row_r, c] W[i, o, r, c]
//!   dX:       dX[b, i, row_r, c] = sum_o dY[b, o, row_r, c] conj(W[i, o, r, c])
//!   dW:       dW[i, o, r, c]     = sum_b conj(X[b, i, row_r, c]) dY[b, o, row_r, c]
//!
//! for the R kept rows and the My kept columns; every other mode of Y and dX is zero. Geometry:
//! `SpectralGeom` (kernels/params.cuh), made by [`SpectralGeom::new`] from the spectra and the
//! weight, the op's only shape check.

mod cpu;
mod cuda;

pub use super::kernels::SpectralGeom;
use super::{check_complex, check_rank, check_same, compute, int};
use super::{ReadySpectrum, UnscaledSpectrum};
use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Which rows (kx) of the half spectrum a spectral convolution keeps (`corners` or `positive` in
/// a config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeConvention {
    /// Rows 0..m and H-m..H: both signs of kx (the standard FNO).
    #[default]
    Corners,
    /// Rows 0..m only (positive kx), as the reference system ran.
    Positive,
}

/// The kept modes of a spectral convolution: `modes` per axis, clamped to what an H x W map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpectralModes {
    pub modes: usize,
    pub convention: ModeConvention,
}

impl SpectralModes {
    pub fn new(modes: usize, convention: ModeConvention) -> Self {
        SpectralModes { modes, convention }
    }

    /// How many of the kept rows of an H-row spectrum are non-negative frequencies (rows 0..pos);
    /// the others are the last rows of the spectrum.
    fn positive_rows(&self, h: usize) -> usize {
        match self.convention {
            ModeConvention::Positive => self.modes.min(h),
            ModeConvention::Corners => self.modes.min(h.div_ceil(2)),
        }
    }

    /// Rows of an H-row spectrum that are kept, in weight order. Corners keeps the non-negative
    /// frequencies 0..min(m, ceil(H/2)) then the negative ones H-min(m, floor(H/2))..H, so no row is
    /// kept twice however small H is.
    pub fn kept_rows(&self, h: usize) -> Vec<usize> {
        let pos = self.positive_rows(h);
        let neg = match self.convention {
            ModeConvention::Positive => 0,
            ModeConvention::Corners => self.modes.min(h / 2),
        };
        (0..pos).chain(h - neg..h).collect()
    }

    /// Columns of the half spectrum (W/2+1 of them) that are kept: min(m, W/2+1).
    pub fn kept_cols(&self, w: usize) -> usize {
        self.modes.min(w / 2 + 1)
    }

    /// The shape of the weight for `c_in` -> `c_out` channels on an H x W map.
    pub fn weight_shape(&self, c_in: usize, c_out: usize, h: usize, w: usize) -> Shape {
        Shape::new([c_in, c_out, self.kept_rows(h).len(), self.kept_cols(w), 2])
    }
}

impl SpectralGeom {
    /// The mix of b samples from ci to co channels on H x Wh half spectra through a weight of
    /// shape `w`, which must be [ci, co, kept rows, kept columns, 2] for `modes`; `why` says what
    /// does not fit otherwise.
    fn new(
        op: &'static str,
        (b, ci, co, h, wh): (usize, usize, usize, usize, usize),
        w: &Shape,
        modes: SpectralModes,
        why: impl FnOnce(usize, usize) -> String,
    ) -> Result<SpectralGeom> {
        let rows = modes.kept_rows(h).len();
        let my = modes.modes.min(wh);
        if w.dims() != [ci, co, rows, my, 2] {
            return Err(Error::invalid(op, why(rows, my)));
        }
        Ok(SpectralGeom {
            b: int(op, b)?,
            ci: int(op, ci)?,
            co: int(op, co)?,
            h: int(op, h)?,
            wh: int(op, wh)?,
            r: int(op, rows)?,
            pos: int(op, modes.positive_rows(h))?,
            my: int(op, my)?,
        })
    }

    /// The kept rows, in weight order.
    pub fn rows(&self) -> Vec<usize> {
        let (h, r, pos) = (self.h as usize, self.r as usize, self.pos as usize);
        (0..pos).chain(h - (r - pos)..h).collect()
    }

    /// Floats of a [B, c, H, Wh] complex spectrum.
    pub(crate) fn spectrum(&self, c: i32) -> usize {
        self.b as usize * c as usize * self.h as usize * self.wh as usize * 2
    }

    /// Floats of the [Ci, Co, R, My] complex weight.
    pub(crate) fn weight(&self) -> usize {
        self.ci as usize * self.co as usize * self.r as usize * self.my as usize * 2
    }
}

/// (B, C, H, Wh) of a half spectrum [B, C, H, Wh, 2].
fn spectrum_dims(op: &'static str, t: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    check_rank(op, t, 5, what)?;
    check_complex(op, t, 5)?;
    let d = t.dims();
    Ok((d[0], d[1], d[2], d[3]))
}

/// The forward's geometry and output shape.
fn mix_geom(xh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<(SpectralGeom, [usize; 5])> {
    const OP: &str = "spectral_mix";
    check_same(OP, &[xh, w])?;
    let (b, ci, h, wh) = spectrum_dims(OP, xh, "half spectrum")?;
    check_rank(OP, w, 5, "spectral weight")?;
    check_complex(OP, w, 5)?;
    let co = w.dims()[1];
    let g = SpectralGeom::new(OP, (b, ci, co, h, wh), w.shape(), modes, |rows, my| {
        format!(
            "{} and {} do not fit: weight must be [C_in={ci}, C_out, kept rows={rows}, kept cols={my}, 2] for {} modes ({:?})",
            xh.shape(),
            w.shape(),
            modes.modes,
            modes.convention
        )
    })?;
    Ok((g, [b, co, h, wh, 2]))
}

/// Y[b, o, r, c] = sum_i X[b, i, r, c] W[i, o, r, c] on the kept modes, zero elsewhere.
pub fn spectral_mix(xh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<Tensor> {
    let _p = super::profile::scope("spectral_mix");
    let (g, shape) = mix_geom(xh, w, modes)?;
    compute(shape, xh, |y| cpu::spectral_mix_fwd(xh, w, &g.rows(), y), |gpu, y| cuda::spectral_mix_fwd(gpu, g, xh, w, y, None))
}

/// [`spectral_mix`] for an irfft2 to width `width` that follows: on a GPU the same launch also
/// writes Y made ready for irfft2's C2R (what [`irfft2_ready`](super::irfft2_ready) takes), so
/// irfft2 runs no glue launch. Elsewhere no ready spectrum. Y is the same either way.
pub fn spectral_mix_ready(xh: &Tensor, w: &Tensor, modes: SpectralModes, width: usize) -> Result<(Tensor, Option<ReadySpectrum>)> {
    if !matches!(xh.device().kind(), DeviceKind::Cuda(_)) {
        return Ok((spectral_mix(xh, w, modes)?, None));
    }
    let _p = super::profile::scope("spectral_mix");
    let (g, shape) = mix_geom(xh, w, modes)?;
    with_ready(xh, shape, width, false, |gpu, y, ready| cuda::spectral_mix_fwd(gpu, g, xh, w, y, ready))
}

/// A fresh output of `shape` on `like`'s GPU computed by `launch`, which also fills a buffer
/// with it made ready for the C2R of irfft2 (or, `adjoint`, of rfft2's adjoint) of width `width`.
fn with_ready(
    like: &Tensor,
    shape: [usize; 5],
    width: usize,
    adjoint: bool,
    launch: impl FnOnce(&super::gpu::Gpu, &mut Tensor, cuda::Ready) -> Result<()>,
) -> Result<(Tensor, Option<ReadySpectrum>)> {
    let gpu = like.device().gpu()?;
    let mut out = Tensor::uninit(shape, like.dtype(), like.device())?;
    let (mut buf, sg) = ReadySpectrum::buffer(gpu, &out, width, adjoint)?;
    launch(gpu, &mut out, Some((&mut buf, sg)))?;
    Ok((out.clone(), Some(ReadySpectrum { buf, of: out, w: width, adjoint })))
}

/// dX's geometry and shape.
fn bwd_input_geom(dyh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<(SpectralGeom, [usize; 5])> {
    const OP: &str = "spectral_mix_bwd_input";
    check_same(OP, &[dyh, w])?;
    let (b, co, h, wh) = spectrum_dims(OP, dyh, "output gradient")?;
    check_rank(OP, w, 5, "spectral weight")?;
    let ci = w.dims()[0];
    let g = SpectralGeom::new(OP, (b, ci, co, h, wh), w.shape(), modes, |_, _| {
        format!("{} and {}: output gradient does not fit the weight", dyh.shape(), w.shape())
    })?;
    Ok((g, [b, ci, h, wh, 2]))
}

/// dX = dY conj(W) summed over output channels, on the kept modes.
pub fn spectral_mix_bwd_input(dyh: &Tensor, w: &Tensor, modes: SpectralModes) -> Result<Tensor> {
    let _p = super::profile::scope("spectral_mix_bwd_input");
    let (g, shape) = bwd_input_geom(dyh, w, modes)?;
    compute(shape, dyh, |dx| cpu::spectral_mix_bwd_input(dyh, w, &g.rows(), dx), |gpu, dx| cuda::spectral_mix_bwd_input(gpu, g, dyh, w, dx, None, 0))
}

/// [`spectral_mix_bwd_input`] for the adjoint of an rfft2 of width-`width` images that follows:
/// on a GPU the same launch also writes dX made ready for that adjoint's C2R (what
/// [`rfft2_bwd_ready`](super::rfft2_bwd_ready) takes). Elsewhere no ready spectrum. `unscaled`,
/// when given, must describe dyh (an R2C whose column scale the launch applies as it reads).
pub fn spectral_mix_bwd_input_ready(
    dyh: &Tensor,
    w: &Tensor,
    modes: SpectralModes,
    width: usize,
    unscaled: Option<&UnscaledSpectrum>,
) -> Result<(Tensor, Option<ReadySpectrum>)> {
    const OP: &str = "spectral_mix_bwd_input";
    let dy_w = dy_width(OP, dyh, unscaled)?;
    if !matches!(dyh.device().kind(), DeviceKind::Cuda(_)) {
        return Ok((spectral_mix_bwd_input(dyh, w, modes)?, None));
    }
    let _p = super::profile::scope(OP);
    let (g, shape) = bwd_input_geom(dyh, w, modes)?;
    with_ready(dyh, shape, width, true, |gpu, dx, ready| cuda::spectral_mix_bwd_input(gpu, g, dyh, w, dx, ready, dy_w))
}

/// The dY width the kernels take: 0 for a gradient as it is, the images' width when `unscaled`
/// describes dyh (only a GPU makes one); one that describes another tensor is an error, since
/// the gradient would then be read unscaled.
fn dy_width(op: &'static str, dyh: &Tensor, unscaled: Option<&UnscaledSpectrum>) -> Result<i32> {
    match unscaled.map(|u| u.width_of(dyh)) {
        None => Ok(0),
        Some(Some(w)) => int(op, w),
        Some(None) => Err(Error::invalid(op, "the unscaled spectrum handed over is not the output gradient's")),
    }
}

/// dW = conj(X) dY summed over the batch, on the kept modes.
pub fn spectral_mix_bwd_weight(xh: &Tensor, dyh: &Tensor, w_shape: &Shape, modes: SpectralModes) -> Result<Tensor> {
    spectral_mix_bwd_weight_unscaled(xh, dyh, None, w_shape, modes)
}

/// [`spectral_mix_bwd_weight`] of a dyh that `unscaled`, when given, describes (as for
/// [`spectral_mix_bwd_input_ready`]).
pub fn spectral_mix_bwd_weight_unscaled(
    xh: &Tensor,
    dyh: &Tensor,
    unscaled: Option<&UnscaledSpectrum>,
    w_shape: &Shape,
    modes: SpectralModes,
) -> Result<Tensor> {
    let _p = super::profile::scope("spectral_mix_bwd_weight");
    const OP: &str = "spectral_mix_bwd_weight";
    check_same(OP, &[xh, dyh])?;
    let dy_w = dy_width(OP, dyh, unscaled)?;
    let fit = |_: usize, _: usize| format!("{} and {}: spectra do not fit a weight of shape {w_shape}", xh.shape(), dyh.shape());
    let (b, ci, h, wh) = spectrum_dims(OP, xh, "half spectrum")?;
    let (b2, co, h2, wh2) = spectrum_dims(OP, dyh, "output gradient")?;
    if (b2, h2, wh2) != (b, h, wh) || w_shape.rank() != 5 {
        return Err(Error::invalid(OP, fit(0, 0)));
    }
    let g = SpectralGeom::new(OP, (b, ci, co, h, wh), w_shape, modes, fit)?;
    compute(w_shape.clone(), xh, |dw| cpu::spectral_mix_bwd_weight(xh, dyh, &g.rows(), dw), |gpu, dw| cuda::spectral_mix_bwd_weight(gpu, g, xh, dyh, dw, dy_w))
}
