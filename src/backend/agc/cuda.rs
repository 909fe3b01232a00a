//! Launcher of kernels/agc.cu.

use cudarc::driver::CudaSlice;

use super::AgcParams;
use crate::backend::gpu::{check_len, per_block_config, Gpu};
use crate::backend::kernels;
use crate::error::Result;
use crate::tensor::Tensor;

/// g_u *= min(1, lambda max(|w_u|, eps) / |g_u|) per unit, in place (the kernel's optional
/// per-unit factors are not asked for).
pub(super) fn agc(gpu: &Gpu, a: AgcParams, w: &Tensor, g: &mut Tensor) -> Result<()> {
    const OP: &str = "agc_unit_f32";
    let (pre, units, post) = a.units();
    let (w, g) = (w.cuda()?, g.cuda_mut()?);
    check_len(OP, "w", w, pre * units * post)?;
    check_len(OP, "g", g, pre * units * post)?;
    let mut factor_out: Option<&mut CudaSlice<f32>> = None;
    // SAFETY: lengths checked against the geometry; one block per unit.
    unsafe { kernels::agc_unit_f32(gpu, per_block_config(units)?, w, g, &mut factor_out, a) }
}
