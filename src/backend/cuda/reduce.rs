//! Launchers of kernels/reduce.cu: deterministic sums and sums of squares (two launches).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{int, launched, Gpu, BLOCK};
use crate::backend::Reduce;
use crate::error::Result;

/// Blocks of the first pass (fixed, so the order of additions never changes).
pub const PARTIALS: usize = 256;

impl Gpu {
    /// sum x or sum x^2, as one number copied back.
    pub fn reduce(&self, op: Reduce, x: &CudaSlice<f32>) -> Result<f32> {
        let code: i32 = match op {
            Reduce::Sum => 0,
            Reduce::SumSq => 1,
        };
        let n64 = x.len() as i64;
        let mut partial = self.zeros::<f32>(PARTIALS)?;
        let mut out = self.zeros::<f32>(1)?;
        let f = self.function("reduce_partial_f32")?;
        let cfg = LaunchConfig { grid_dim: (PARTIALS as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(&mut partial).arg(&n64).arg(&code);
        // SAFETY: partial holds one slot per block; the kernel bounds-checks x by n.
        launched("reduce_partial_f32", unsafe { l.launch(cfg) })?;
        let p = int("reduce_final_f32", PARTIALS)?;
        let f = self.function("reduce_final_f32")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&partial).arg(&mut out).arg(&p);
        // SAFETY: one block reads PARTIALS values and writes out[0].
        launched("reduce_final_f32", unsafe { l.launch(cfg) })?;
        Ok(self.download(&out)?[0])
    }
}
