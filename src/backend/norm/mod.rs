//! FP32-promoted LayerNorm, RMSNorm and InstanceNorm (kernels/norm.cuh, norm.cu), forward and
//! backward: statistics, the affine parameters and their gradients in fp32 (f64 on the CPU), the
//! input's type for y and dx. The f16 and bf16 kernels of kernels/dev/norm_lowp.cu have a
//! public entry of their own ([`cuda::dev`]) for the tests and benchmarks, until the GPU stores
//! 2-byte activations. Geometry: `NormGeom` (kernels/params.cuh).

mod cpu;
pub mod cuda;

pub use super::kernels::NormGeom;
use super::layout::check_channel_vec;
use super::{bcs, check_compute, check_eq, check_same, int, on_device};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Normalisations. Statistics are accumulated in f64 on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Over the channels of each pixel: (x - mean) / sqrt(var + eps).
    LayerNorm,
    /// Over the channels of each pixel: x / sqrt(mean(x^2) + eps).
    RmsNorm,
    /// Over H x W of each sample and channel: (x - mean) / sqrt(var + eps).
    InstanceNorm,
}

impl NormKind {
    pub fn over_channels(self) -> bool {
        matches!(self, NormKind::LayerNorm | NormKind::RmsNorm)
    }
    pub fn centres(self) -> bool {
        !matches!(self, NormKind::RmsNorm)
    }
    fn code(self) -> i32 {
        match self {
            NormKind::LayerNorm => 0,
            NormKind::RmsNorm => 1,
            NormKind::InstanceNorm => 2,
        }
    }
}

impl NormGeom {
    /// A norm of `kind` over x viewed as [b, c, s].
    pub fn new(op: &'static str, kind: NormKind, (b, c, s): (usize, usize, usize), eps: f64) -> Result<NormGeom> {
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(Error::invalid(op, format!("eps must be finite and >= 0, got {eps}")));
        }
        Ok(NormGeom { kind: kind.code(), b: int(op, b)?, c: int(op, c)?, s: int(op, s)?, eps: eps as f32 })
    }
    /// Normalisation groups: B S for the channel norms, B C for InstanceNorm.
    pub fn groups(&self) -> usize {
        if self.kind == 2 {
            self.b as usize * self.c as usize
        } else {
            self.b as usize * self.s as usize
        }
    }
    pub fn numel(&self) -> usize {
        self.b as usize * self.c as usize * self.s as usize
    }
    /// The shape of the statistics: [B, S] or [B, C].
    fn stats(&self) -> Shape {
        if self.kind == 2 {
            Shape::new([self.b as usize, self.c as usize])
        } else {
            Shape::new([self.b as usize, self.s as usize])
        }
    }
}

/// Output, mean and reciprocal standard deviation of a normalisation of x [B, C, ...].
pub struct NormOut {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

fn geometry(op: &'static str, kind: NormKind, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<NormGeom> {
    if x.rank() < 2 {
        return Err(Error::bad_shape(op, x.shape(), "expected [B, C, ...]"));
    }
    for p in gamma.iter().chain(beta.iter()) {
        check_same(op, &[x, p])?;
        check_channel_vec(op, x, p)?;
    }
    NormGeom::new(op, kind, bcs(x), eps)
}

pub fn norm(kind: NormKind, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<NormOut> {
    let _p = super::profile::scope("norm");
    check_compute("norm", x)?;
    let g = geometry("norm", kind, x, gamma, beta, eps)?;
    let mut y = Tensor::zeros(x.shape().clone(), x.dtype(), x.device())?;
    let mut mean = Tensor::zeros(g.stats(), x.dtype(), x.device())?;
    let mut rstd = Tensor::zeros(g.stats(), x.dtype(), x.device())?;
    on_device(
        x.device(),
        (&mut y, &mut mean, &mut rstd),
        |(y, m, r)| cpu::fwd(kind, x, gamma, beta, eps, y, m, r),
        |gpu, (y, m, r)| cuda::fwd(gpu, g, x, gamma, beta, y, m, r),
    )?;
    Ok(NormOut { y, mean, rstd })
}

/// Gradients of a normalisation: (dx, dgamma, dbeta), the last two when asked for.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn norm_bwd(
    kind: NormKind,
    x: &Tensor,
    dy: &Tensor,
    gamma: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_dgamma: bool,
    want_dbeta: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let _p = super::profile::scope("norm_bwd");
    check_same("norm_bwd", &[x, dy, mean, rstd])?;
    check_eq("norm_bwd", x, dy)?;
    let g = geometry("norm_bwd", kind, x, gamma, None, 0.0)?;
    let stat = g.stats();
    if mean.shape() != &stat || rstd.shape() != &stat {
        return Err(Error::mismatch_because("norm_bwd", mean.shape(), &stat, "statistics do not fit the input"));
    }
    let c = x.dims()[1];
    let mut dx = Tensor::zeros(x.shape().clone(), x.dtype(), x.device())?;
    let mut dgamma = want_dgamma.then(|| Tensor::zeros([c], x.dtype(), x.device())).transpose()?;
    let mut dbeta = want_dbeta.then(|| Tensor::zeros([c], x.dtype(), x.device())).transpose()?;
    on_device(
        x.device(),
        (&mut dx, dgamma.as_mut(), dbeta.as_mut()),
        |(dx, dg, db)| cpu::bwd(kind, x, dy, gamma, mean, rstd, dx, dg, db),
        |gpu, (dx, dg, db)| cuda::bwd(gpu, g, x, dy, gamma, mean, rstd, dx, dg, db),
    )?;
    Ok((dx, dgamma, dbeta))
}
