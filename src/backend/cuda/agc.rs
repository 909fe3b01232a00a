//! Launcher of kernels/agc.cu: unit-wise (or per-tensor, units = 1) adaptive gradient clipping in
//! one launch, norms and rescaling together, nothing read back.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, int, launched, per_block_config, push_opt, Gpu};
use crate::error::Result;

pub use crate::backend::Units;

impl Gpu {
    /// g_u *= min(1, lambda max(|w_u|, eps) / |g_u|) per unit, in place; returns nothing, and
    /// writes each unit's factor into `factors` when given.
    pub fn agc_unit(&self, w: &CudaSlice<f32>, g: &mut CudaSlice<f32>, factors: Option<&mut CudaSlice<f32>>, u: Units, lambda: f32, eps: f32) -> Result<()> {
        const OP: &str = "agc_unit_f32";
        let (pre, units, post) = u;
        check_len(OP, "w", w, pre * units * post)?;
        check_len(OP, "g", g, pre * units * post)?;
        let (p, n, q) = (int(OP, pre)?, int(OP, units)?, int(OP, post)?);
        let f = self.function(OP)?;
        let null = 0u64;
        let mut l = self.stream.launch_builder(&f);
        l.arg(w).arg(g);
        push_opt(&mut l, OP, "factors", factors, units, &null)?;
        l.arg(&p).arg(&n).arg(&q).arg(&lambda).arg(&eps);
        // SAFETY: lengths checked above; one block per unit.
        launched(OP, unsafe { l.launch(per_block_config(units)?) })
    }
}
