//! Adaptive gradient clipping (Brock et al. 2021; kernels/agc.cu): per unit u of a weight viewed as
//! [pre, units, post] (units along its output axis), G_u *= min(1, lambda max(|W_u|, eps) / |G_u|),
//! unchanged when |G_u| = 0; per tensor is units = 1. Norms and rescaling in one launch, nothing
//! read back. Geometry: `AgcParams` (kernels/params.cuh).

mod cpu;
mod cuda;

pub use super::kernels::AgcParams;
use super::{check_eq, check_same, int, on_device, own};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A tensor viewed as [pre, units, post]: the units of adaptive gradient clipping along one axis.
pub type Units = (usize, usize, usize);

impl AgcParams {
    pub fn new(op: &'static str, (pre, units, post): Units, lambda: f64, eps: f64) -> Result<AgcParams> {
        if !(lambda > 0.0 && lambda.is_finite() && eps >= 0.0 && eps.is_finite()) {
            return Err(Error::invalid(op, format!("lambda must be finite and > 0 and eps finite and >= 0, got {lambda} and {eps}")));
        }
        Ok(AgcParams { pre: int(op, pre)?, units: int(op, units)?, post: int(op, post)?, lambda: lambda as f32, eps: eps as f32 })
    }
    pub fn units(&self) -> Units {
        (self.pre as usize, self.units as usize, self.post as usize)
    }
}

/// Adaptive gradient clipping of `g` in place against its weight `w` (same shape): unit-wise
/// along `axis` (the output units), or per tensor when `axis` is None.
pub fn agc(w: &Tensor, g: &mut Tensor, axis: Option<usize>, lambda: f64, eps: f64) -> Result<()> {
    let _p = super::profile::scope("agc");
    check_same("agc", &[w, g])?;
    check_eq("agc", w, g)?;
    let d = g.dims();
    let units = match axis {
        None => (1, 1, g.numel()),
        Some(a) if a < d.len() => (d[..a].iter().product(), d[a], d[a + 1..].iter().product()),
        Some(a) => return Err(Error::bad_shape("agc", g.shape(), format!("no axis {a}"))),
    };
    let a = AgcParams::new("agc", units, lambda, eps)?;
    own(g)?;
    let dev = g.device().clone();
    on_device(&dev, g, |g| cpu::agc(w, g, units, lambda, eps), |gpu, g| cuda::agc(gpu, a, w, g))
}
